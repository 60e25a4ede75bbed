"""Fixtures for the status page tests (the parts themselves are in page_stack.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from page_stack import NODE_TOKEN, chromium_driver
from selenium import webdriver

from sim.fleet import FleetProcess


@pytest.fixture(scope="session")
def page_fleet() -> Iterator[FleetProcess]:
    with FleetProcess(count=8, api_key=NODE_TOKEN) as f:
        yield f


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = chromium_driver(tmp_path / "profile", tmp_path / "chromedriver.log", 1280, 900)
    try:
        yield driver
    finally:
        driver.quit()
