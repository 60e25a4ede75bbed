"""Fixtures for the simulated fleet's own tests: one fleet per session, reset per test."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sim.fleet import Fleet


@pytest.fixture(scope="session")
def _session_fleet() -> Iterator[Fleet]:
    with Fleet(count=3) as fleet:
        yield fleet


@pytest.fixture
def fleet(_session_fleet: Fleet) -> Iterator[Fleet]:
    _session_fleet.reset()
    for n in _session_fleet.nodes:
        _session_fleet.set_api_key(n, None)
    yield _session_fleet
    _session_fleet.reset()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c
