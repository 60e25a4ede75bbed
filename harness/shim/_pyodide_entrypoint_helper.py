"""Test-harness stand-in for the runtime-internal helper the `workers` SDK imports.

The offline workerd has no such module. Only what the SDK touches on our code path is
provided; anything else fails loudly instead of pretending to work.
"""

import js


def patchWaitUntil(ctx) -> None:
    # Production wraps ctx.waitUntil so it accepts Python awaitables; the old runtime's
    # waitUntil accepts any thenable, which a PyProxy of an asyncio Task already is.
    return None


async def doAnImport(name: str):
    raise ImportError(f"harness: JS module import {name!r} is not available offline")


cloudflareWorkersModule = None
cloudflareSocketsModule = None
__all__ = [
    "cloudflareSocketsModule",
    "cloudflareWorkersModule",
    "doAnImport",
    "js",
    "patchWaitUntil",
]
