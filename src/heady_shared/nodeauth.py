"""Node credentials for the gateway's node API: `hn1.<n>.<hex>`, where hex is the first 32 hex
chars of HMAC-SHA256(key=NODE_SECRET, msg="heady-node:<n>").

The credential says *which* node calls (leases record it), and the gateway needs no table of
credentials: it recomputes the MAC from the one Worker secret. A client key has no `hn1.` form,
so it can never pass as a node, and a node credential is refused on client routes by the shell.
"""

from __future__ import annotations

import hashlib
import hmac

from heady_shared.routes import NODE_NUMBERS

PREFIX = "hn1"
MAC_HEX = 32


def _mac(secret: str, node: int) -> str:
    digest = hmac.new(secret.encode(), f"heady-node:{node}".encode(), hashlib.sha256)
    return digest.hexdigest()[:MAC_HEX]


def node_credential(secret: str, node: int) -> str:
    """The credential node `node` presents (the operator gives it as HEADY_NODE_CREDENTIAL)."""
    if not secret:
        raise ValueError("NODE_SECRET is empty")
    if node not in NODE_NUMBERS:
        raise ValueError(f"no node {node}")
    return f"{PREFIX}.{node}.{_mac(secret, node)}"


def node_of(secret: str | None, credential: object) -> int | None:
    """The node a credential belongs to, or None (wrong form, unknown node, bad MAC, no secret).
    The MAC is compared in constant time."""
    if not secret or not isinstance(credential, str) or len(credential) > 64:
        return None
    parts = credential.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1].isdigit() or len(parts[1]) > 2:
        return None
    node = int(parts[1])
    if node not in NODE_NUMBERS:
        return None
    if not hmac.compare_digest(parts[2].encode(), _mac(secret, node).encode()):
        return None
    return node
