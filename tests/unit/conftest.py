"""The eight-node fleet as the Worker's env and config, built one way for every unit test.

Fixtures for tests; the builders themselves for module-level constants and hypothesis tests,
which cannot take a function-scoped fixture (`from tests.unit.conftest import fleet_env`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import pytest

from config import GatewayConfig, load_config
from heady_shared.routes import NODE_NUMBERS, endpoint_key

NODE_URL = "https://node{n}.example"
Slot = Literal["configured", "invalid", "unconfigured"]


def fleet_env(
    url: str = NODE_URL, *, slots: Mapping[int, Slot] | None = None, **extra: str | None
) -> dict[str, str | None]:
    """Every node's endpoint secret (`url` with its number), then `extra` on top (None: unset).

    `slots` marks nodes "invalid" (an ftp URL, which the endpoint verdict refuses) or
    "unconfigured" (no secret); the rest are configured.
    """
    env: dict[str, str | None] = {}
    for n in NODE_NUMBERS:
        slot = (slots or {}).get(n, "configured")
        if slot == "configured":
            env[endpoint_key(n)] = url.format(n=n)
        elif slot == "invalid":
            env[endpoint_key(n)] = f"ftp://node{n}.example"
    env.update(extra)
    return env


def fleet_config(
    url: str = NODE_URL, *, slots: Mapping[int, Slot] | None = None, **extra: str | None
) -> GatewayConfig:
    return load_config(fleet_env(url, slots=slots, **extra))


@pytest.fixture(name="fleet_env")
def fleet_env_builder() -> Callable[..., dict[str, str | None]]:
    """The fleet's env builder, as a fixture: `fleet_env(MAX_ATTEMPTS="2")`."""
    return fleet_env


@pytest.fixture(scope="session")
def fleet() -> GatewayConfig:
    """The fleet's config with every setting at its default."""
    return fleet_config()
