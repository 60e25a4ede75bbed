"""What the status page tests run against: the simulated fleet in its own process (as `make
dev` runs it), the gateway in the offline Workers runtime, and Debian's headless Chromium
driven by selenium through Debian's chromedriver (`make browser-install`; nothing is
downloaded at test time)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

from harness.bindings import fleet_env
from harness.gateway import ROOT, Gateway, build_config
from sim.fleet import FleetProcess

API_KEY = "status-page-client-key-7f3a9c"
NODE_TOKEN = "status-page-node-token-51be0d"
# Node 7's secret holds a URL with credentials: the gateway rejects it (invalid), and the
# page must say why without ever showing the value.
NODE7_VALUE = "https://admin:hunter2-node7@node-7.example.com"
CHROMIUM = os.environ.get("HEADY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HEADY_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = ROOT / ".harness" / "browser"
# Headless, and nothing that reaches out of the machine on its own (sync, component
# updates, QUIC); --no-sandbox because CI containers run as root.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def page_bindings(fleet: FleetProcess, **extra: str) -> dict[str, str]:
    """Nodes 1-6 on the simulated fleet, 7 invalid, 8 not set: all five states on one page."""
    settings = {
        "COLAB_ENDPOINT_7": NODE7_VALUE,
        "ATTEMPT_TIMEOUT_S": "2",
        "PROBE_TIMEOUT_S": "2",
        # Every cron tick probes every node (not only down/unknown ones), so a test moves
        # the gateway's knowledge with one gateway.scheduled() call.
        "PROBE_UP_EVERY_S": "60",
        # A down mark outlives the test: no node drifts back to unknown halfway through.
        "COOLDOWN_BASE_S": "600",
        "COOLDOWN_MAX_S": "600",
    }
    return fleet_env(
        fleet, node_token=NODE_TOKEN, api_keys=API_KEY, nodes=range(1, 7), **settings | extra
    )


def secrets_of(fleet: FleetProcess) -> list[str]:
    """Strings that must never reach the page: node URLs (and host:port), token, key."""
    out = [NODE_TOKEN, API_KEY, NODE7_VALUE, "hunter2", "node-7.example.com"]
    for n in range(1, 9):
        url = fleet.url(n)
        out += [url, url.split("://", 1)[1]]
    return out


def start_gateway(fleet: FleetProcess) -> Gateway:
    return Gateway(build_config(bindings=page_bindings(fleet))).start()


def chromium_driver(profile: Path, log: Path, width: int, height: int) -> webdriver.Chrome:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run `make browser-install` first")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")  # a fresh profile: empty localStorage
    opts.add_argument(f"--window-size={width},{height}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium then skips Selenium Manager (no download attempt).
    service = Service(CHROMEDRIVER, log_output=str(log))
    return webdriver.Chrome(service=service, options=opts)


def chromium_version() -> str:
    out = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()
