"""The status page in a real browser: Debian's headless Chromium, driven by selenium, against
the gateway in the offline Workers runtime in front of the simulated fleet (its own process,
broken through its control API). One story, in the order an operator lives it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from page_stack import (
    API_KEY,
    SCREENSHOTS,
    chromium_version,
    page_bindings,
    secrets_of,
    start_gateway,
)
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

import status_page as sp
from harness.gateway import Gateway, build_config
from heady_shared.failures import EXPLAIN
from sim.fleet import FleetProcess

POLL_S = sp.POLL_MS / 1000
# "Within one poll": the page's next poll starts at most POLL_S after a change; the rest
# is the request and the render on a loaded 2-core CI machine.
ONE_POLL_S = POLL_S + 3.0
STORE = "heady-gateway.client-key"
CRON = "* * * * *"  # with PROBE_UP_EVERY_S=60 every tick probes every node
MIXED = {1: "up", 2: "up", 3: "down", 4: "up", 5: "down", 6: "up", 7: "invalid", 8: "unconfigured"}

TILES_JS = """
return [...document.querySelectorAll('#roles .tile')].map(t => {
  const f = (name) => { const e = t.querySelector('[data-field=' + name + ']');
                        return e ? e.textContent : null; };
  return {node: Number(t.dataset.node), state: t.dataset.state,
          role: t.closest('.role').dataset.role, badge: t.querySelector('.badge').textContent,
          reason: f('reason'), why: f('why'), until: f('until'), load: f('load'),
          config: f('config')};
});
"""


@pytest.fixture
def gateway(page_fleet: FleetProcess) -> Iterator[Gateway]:
    page_fleet.reset()
    gw = start_gateway(page_fleet)
    try:
        yield gw
    finally:
        gw.stop()  # idempotent: the story stops it itself to see the stale mark
        page_fleet.reset()


def wait_for(driver: WebDriver, what: str, cond: Callable[[], Any], timeout: float) -> Any:
    """cond() once it is truthy; fails naming `what` after `timeout` seconds."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda _d: cond(), message=f"{what} (waited {timeout} s)"
    )


def tiles(driver: WebDriver) -> dict[int, dict]:
    return {t["node"]: t for t in driver.execute_script(TILES_JS)}


def states(driver: WebDriver) -> dict[int, str]:
    return {n: t["state"] for n, t in tiles(driver).items()}


def js(driver: WebDriver, script: str) -> Any:
    return driver.execute_script(script)


def status_polls(gw: Gateway) -> int:
    return sum('"route":"/api/status"' in line for line in list(gw.lines))


def assert_no_secret(driver: WebDriver, fleet: FleetProcess) -> None:
    inputs = js(driver, "return [...document.querySelectorAll('input')].map(i => i.value)")
    seen = "\n".join([driver.page_source, driver.current_url, driver.title, *inputs])
    for secret in secrets_of(fleet):
        assert secret not in seen, f"{secret!r} is in the page"
    ports = "|".join(str(fleet.url(n).rsplit(":", 1)[1]) for n in range(1, 9))
    assert not re.search(rf":({ports})\b", seen)


def key_prompt_shown(driver: WebDriver) -> bool:
    return js(driver, "return !document.getElementById('key-form').hidden")


def enter_key(driver: WebDriver, key: str) -> None:
    """Type into the focused element, as a keyboard user does (the prompt focuses the input)."""
    active = driver.switch_to.active_element
    assert active.get_attribute("id") == "key"
    active.send_keys(key + Keys.ENTER)


def shoot(driver: WebDriver, name: str, width: int) -> None:
    """A full-page screenshot with a `width` CSS pixel viewport (a phone's below 600: mobile
    emulation, so the page's viewport meta applies); the viewport grows to the page height."""
    metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    metrics["height"] = js(driver, "return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    assert js(driver, "return document.documentElement.scrollWidth") == width  # no overflow
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    assert driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == width  # IHDR: width, then height
    assert int.from_bytes(png[20:24], "big") == metrics["height"]


# ~45 s alone (most of it deliberate waits for polls); room for a loaded CI machine.
@pytest.mark.timeout(300)
def test_status_page_in_chromium(
    browser: WebDriver, gateway: Gateway, page_fleet: FleetProcess
) -> None:
    fleet, gw, d = page_fleet, gateway, browser
    print(chromium_version())

    # -- first visit: a prompt, no data, no error dump ------------------------------------
    d.get(gw.url + "/")
    assert d.title == "Heady gateway \u00b7 cluster status"
    assert key_prompt_shown(d)
    assert js(d, "return document.activeElement.id") == "key"
    assert tiles(d) == {}

    # -- a wrong key: a clear prompt to re-enter, nothing stored ----------------------------
    enter_key(d, "not-a-valid-key")
    wait_for(
        d,
        "the wrong-key prompt",
        lambda: js(d, "return document.getElementById('key-message').dataset.kind") == "error",
        ONE_POLL_S,
    )
    assert key_prompt_shown(d)
    message = d.find_element("id", "key-message").text
    assert "rejected" in message and "401" in message
    assert "unauthorized" not in message and "{" not in message  # no JSON dump
    assert js(d, f"return localStorage.getItem('{STORE}')") is None
    assert tiles(d) == {}

    # -- the right key: eight tiles, nothing observed yet -----------------------------------
    enter_key(d, API_KEY)
    wait_for(d, "eight tiles", lambda: len(tiles(d)) == 8, ONE_POLL_S)
    assert not key_prompt_shown(d)
    assert states(d) == {n: "unknown" for n in range(1, 7)} | {7: "invalid", 8: "unconfigured"}
    t = tiles(d)
    assert [t[n]["role"] for n in range(1, 9)] == [
        "reasoning", "reasoning", "code", "code", "vision", "vision", "batch", "batch"
    ]  # fmt: skip
    assert t[7]["config"] == "URL must not carry credentials; the gateway sends NODE_TOKEN itself"
    assert t[8]["config"] == "secret not set"
    assert js(d, f"return localStorage.getItem('{STORE}')") == API_KEY
    assert d.current_url == gw.url + "/"
    problems = d.find_element("id", "problems")
    assert problems.is_displayed() and "COLAB_ENDPOINT_7" in problems.text
    assert_no_secret(d, fleet)

    # -- the cluster in a mixed state, as the gateway's cron probes find it -----------------
    fleet.set(5, "ngrok_offline")
    fleet.set_load(1, 2)
    fleet.set_load(6, 5)
    gw.scheduled(cron=CRON)
    wait_for(d, "probed states", lambda: states(d) == MIXED | {3: "up"}, ONE_POLL_S)
    t = tiles(d)
    assert t[5]["reason"] == "tunnel_offline" and t[5]["until"]
    assert t[5]["why"] == EXPLAIN["tunnel_offline"]
    assert t[1]["load"] == "2 waiting" and t[6]["load"] == "5 waiting"
    assert [t[n]["badge"] for n in (1, 5, 7, 8)] == [
        "\u2713up", "\u2715down", "!invalid", "\u2013unconfigured"
    ]  # fmt: skip

    # -- break node 3: its tile turns down, with its reason, within one poll ----------------
    fleet.set(3, "refuse")
    gw.scheduled(cron=CRON)
    broke = time.monotonic()
    wait_for(d, "node 3 down", lambda: tiles(d)[3]["state"] == "down", ONE_POLL_S)
    assert time.monotonic() - broke <= ONE_POLL_S
    t = tiles(d)
    assert t[3]["reason"] == "refused"
    assert t[3]["why"] == EXPLAIN["refused"]
    assert re.search(r"\(in (9|10) min\)", t[3]["until"])  # COOLDOWN_BASE_S=600
    assert states(d) == MIXED
    api = httpx.get(
        gw.url + "/api/status", headers={"authorization": f"Bearer {API_KEY}"}, timeout=30
    ).json()
    shown = {
        n["node"]: n["state"] if n["config"] == "configured" else n["config"] for n in api["nodes"]
    }
    assert shown == MIXED  # the page shows what the API says
    summary = d.find_element("id", "summary").text
    assert summary == "8 nodes: 4 up, 2 down, 1 invalid, 1 unconfigured"
    code = d.find_element("css selector", '.role[data-role="code"] h2').text
    assert "1 of 2 available" in code
    # The CSP let the hashed stylesheet apply: a down tile has the red edge (light scheme).
    edge = js(d, "return getComputedStyle(document.querySelector("
              "'.tile[data-node=\"3\"]')).borderLeftColor")  # fmt: skip
    assert edge == "rgb(196, 32, 43)"
    assert_no_secret(d, fleet)

    # -- screenshots: desktop and phone width, light and dark -------------------------------
    shoot(d, "status-desktop.png", 1280)
    shoot(d, "status-phone.png", 390)
    d.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    assert js(d, "return getComputedStyle(document.body).backgroundColor") == "rgb(13, 17, 23)"
    shoot(d, "status-desktop-dark.png", 1280)
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert js(d, "return getComputedStyle(document.body).backgroundColor") == "rgb(244, 246, 248)"

    # -- keyboard: Tab reaches the tiles, and focus survives the next poll's re-render ------
    # A reload starts from the top of the document, and the stored key is not asked again.
    d.refresh()
    wait_for(d, "tiles after a reload", lambda: states(d) == MIXED, ONE_POLL_S)
    assert not key_prompt_shown(d)
    order = []
    for _ in range(3):
        d.switch_to.active_element.send_keys(Keys.TAB)
        order.append(js(d, "const a = document.activeElement; return a.id || a.className"))
    assert order == ["skip", "change-key", "tile"]
    # Mark the focused element; the next poll replaces every tile with a new element.
    js(d, "document.activeElement.dataset.old = '1'")
    wait_for(
        d,
        "the next poll's re-render",
        lambda: js(d, "return document.activeElement.dataset.old !== '1'"),
        ONE_POLL_S,
    )
    focused = js(d, "const a = document.activeElement; return [a.className, a.dataset.node]")
    assert focused == ["tile", "1"]

    # -- bring node 3 back: up again within one poll ----------------------------------------
    fleet.set(3, "healthy")
    gw.scheduled(cron=CRON)
    back = time.monotonic()
    wait_for(d, "node 3 up", lambda: tiles(d)[3]["state"] == "up", ONE_POLL_S)
    assert time.monotonic() - back <= ONE_POLL_S
    assert tiles(d)[3]["reason"] is None and tiles(d)[3]["why"] is None

    # -- a hidden tab does not poll; showing it again polls at once -------------------------
    d.minimize_window()
    wait_for(d, "a hidden tab", lambda: js(d, "return document.hidden"), 2.0)
    time.sleep(0.5)  # a poll already in flight may still land
    polls = status_polls(gw)
    time.sleep(2 * POLL_S + 1)
    assert status_polls(gw) == polls
    d.set_window_rect(width=1280, height=900)
    wait_for(d, "the poll on showing the tab", lambda: status_polls(gw) > polls, 2.0)

    # -- a key that stops working (rotated): the prompt again, via the keyboard -------------
    change = d.find_element("id", "change-key")
    change.send_keys(Keys.ENTER)
    assert key_prompt_shown(d)
    assert js(d, f"return localStorage.getItem('{STORE}')") is None
    enter_key(d, "rotated-away-key")
    wait_for(
        d,
        "the wrong-key prompt",
        lambda: js(d, "return document.getElementById('key-message').dataset.kind") == "error",
        ONE_POLL_S,
    )
    assert not d.find_element("id", "roles").is_displayed()
    assert tiles(d) == {}  # no key, no data: the old key's view is gone
    enter_key(d, API_KEY)
    wait_for(d, "tiles again", lambda: states(d) == MIXED | {3: "up"}, ONE_POLL_S)
    assert_no_secret(d, fleet)

    # Nothing the page did broke its own CSP or threw (401s and refused fetches are expected
    # network errors and are not counted).
    bad = [
        e["message"]
        for e in d.get_log("browser")
        if re.search(r"Content Security Policy|Refused to|TrustedHTML|Uncaught", e["message"])
    ]
    assert bad == []

    # -- the gateway stops: the stale mark, with the last known state kept ------------------
    gw.stop()
    stopped = time.monotonic()
    wait_for(d, "the stale mark", lambda: d.find_element("id", "stale").is_displayed(), ONE_POLL_S)
    assert time.monotonic() - stopped <= ONE_POLL_S
    assert js(d, "return document.body.dataset.stale") == "true"
    assert "cannot be reached" in d.find_element("id", "stale").text
    assert states(d) == MIXED | {3: "up"}
    shoot(d, "status-stale-phone.png", 390)
    assert_no_secret(d, fleet)


def test_a_gateway_without_client_keys_is_explained_not_dumped(
    browser: WebDriver, page_fleet: FleetProcess
) -> None:
    d = browser
    gw = Gateway(build_config(bindings=page_bindings(page_fleet, GATEWAY_API_KEYS=""))).start()
    try:
        d.get(gw.url + "/")
        enter_key(d, API_KEY)
        wait_for(d, "the error banner", lambda: d.find_element("id", "stale").is_displayed(), 5)
        text = d.find_element("id", "stale").text
        assert "HTTP 503 not_configured" in text
        assert "set the GATEWAY_API_KEYS secret" in text
        assert "{" not in text and "request_id" not in text  # words, not a JSON dump
        assert not key_prompt_shown(d)  # not a key problem: the key is kept
        assert js(d, f"return localStorage.getItem('{STORE}')") == API_KEY
        assert tiles(d) == {}
        assert_no_secret(d, page_fleet)
    finally:
        gw.stop()
