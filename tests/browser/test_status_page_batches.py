"""The status page's Batches and Fine-tuning sections in Debian's headless Chromium, fed a
synthetic `/api/status` (the shapes `batches.status_view` and `status.fine_tuning_view` answer:
docs/batch.md, docs/fine-tuning-jobs.md) by a small local server that serves the page exactly as
the gateway does (`status_page.serve`: same bytes, same CSP). Checks what an operator reads: a
progress bar per open batch (completed and failed shares) or job (steps), its status, and which
node holds which shard or trains which job; a section hides when nothing runs."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from page_stack import SCREENSHOTS
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

import status_page as sp
from tests.support.local import serving

KEY = "batches-page-key"
NOW = int(time.time())
NODES = [
    {"node": n, "config": "configured", "state": "up", "latency_ms": 12.0} for n in range(1, 9)
]
ROUTES = {"batch": {"pair": [7, 8], "fallback": [1, 2]}}
RUNNING = {
    "id": "batch_0123456789abcdef01234567",
    "status": "in_progress",
    "role": "batch",
    "model": "Qwen/Qwen2.5-7B-Instruct-AWQ",
    "created_at": NOW - 90,
    "expires_at": NOW + 86_310,
    "request_counts": {"total": 2000, "completed": 900, "failed": 100},
    "shards": {"total": 20, "pending": 8, "leased": 2, "done": 10},
    "holders": [
        {"node": 7, "seq": 11, "kind": "lines", "lines": 100, "expires_at": NOW + 100},
        {"node": 8, "seq": 12, "kind": "lines", "lines": 100, "expires_at": NOW + 110},
    ],
}
VALIDATING = {
    "id": "batch_fedcba9876543210fedcba98",
    "status": "validating",
    "role": "batch",
    "model": None,
    "created_at": NOW - 2,
    "expires_at": NOW + 86_398,
    "request_counts": {"total": 0, "completed": 0, "failed": 0},
    "shards": {"total": 0, "pending": 0, "leased": 0, "done": 0},
    "holders": [{"node": 8, "seq": 0, "kind": "validate", "lines": 0, "expires_at": NOW + 120}],
}

BATCHES_JS = """
return [...document.querySelectorAll('#batch-list .batch')].map(b => ({
  id: b.dataset.batch, status: b.querySelector('.status').textContent,
  progress: b.querySelector('[data-field=progress]').textContent,
  shards: (b.querySelector('[data-field=shards]') || {}).textContent || null,
  ok: b.querySelector('.bar .ok').getBoundingClientRect().width,
  fail: b.querySelector('.bar .fail').getBoundingClientRect().width,
  bar: b.querySelector('.bar').clientWidth,
  now: b.querySelector('.bar').getAttribute('aria-valuenow'),
  max: b.querySelector('.bar').getAttribute('aria-valuemax'),
  holders: [...b.querySelectorAll('.holders li')].map(h => [Number(h.dataset.node), h.textContent]),
}));
"""


class _Status(ThreadingHTTPServer):
    body: dict[str, Any]


class _Handler(BaseHTTPRequestHandler):
    server: _Status

    def do_GET(self) -> None:
        if self.path == "/api/status":
            if self.headers.get("authorization") != f"Bearer {KEY}":
                self._send(401, {"content-type": "application/json"}, b"{}")
            else:
                raw = json.dumps(self.server.body).encode()
                self._send(200, {"content-type": "application/json"}, raw)
            return
        page = sp.serve("GET", self.path, None)
        if page is None or page.body is None:
            self._send(404, {}, b"")
        else:
            self._send(page.status, page.headers, page.body.encode())

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Status]:
    srv = _Status(("127.0.0.1", 0), _Handler)
    # The gateway's own clock at NOW (taken when this module was collected, maybe minutes
    # before the test runs): the page measures "lease until ... (in 100 s)" against it.
    clock = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW))
    srv.body = {"nodes": NODES, "routes": ROUTES, "gateway": {"version": "test", "time": clock}}
    with serving(srv):
        yield srv


def _wait(d: WebDriver, what: str, cond: Any, timeout: float = sp.POLL_MS / 1000 + 5) -> Any:
    return WebDriverWait(d, timeout, poll_frequency=0.1).until(lambda _d: cond(), message=what)


def _shown(d: WebDriver, section: str = "batches") -> bool:
    return d.execute_script(f"return !document.getElementById('{section}').hidden")


def _sign_in(d: WebDriver, server: _Status) -> None:
    """The page of `server` opened with the key entered, its eight node tiles drawn."""
    d.get(f"http://127.0.0.1:{server.server_address[1]}/")
    d.switch_to.active_element.send_keys(KEY + Keys.ENTER)
    _wait(d, "eight tiles", lambda: len(d.find_elements("css selector", "#roles .tile")) == 8)


@pytest.mark.timeout(120)
def test_batches_section_shows_progress_status_and_shard_holders(
    browser: WebDriver, server: _Status
) -> None:
    d = browser
    _sign_in(d, server)
    assert not _shown(d)  # no `batches` field (a gateway before issue 16): no section

    server.body = {**server.body, "batches": {"running": 3, "mine": [VALIDATING, RUNNING]}}
    _wait(d, "the batches section", lambda: _shown(d))
    count = d.find_element("id", "batches-count").text
    assert count == "2 open for this key, 3 at work in all"
    fresh, running = d.execute_script(BATCHES_JS)
    assert (running["id"], running["status"]) == (RUNNING["id"], "in_progress")
    assert running["progress"] == "1,000 of 2,000 lines (50%), 100 failed"
    assert running["shards"] == "shards: 10 done, 2 running, 8 waiting, of 20"
    assert (running["now"], running["max"]) == ("1000", "2000")
    # The bar: completed 45 % green, failed 5 % red (of the inner width; sub-pixel rounding).
    assert abs(running["ok"] - 0.45 * running["bar"]) <= 1.5
    assert abs(running["fail"] - 0.05 * running["bar"]) <= 1.5
    assert [n for n, _ in running["holders"]] == [7, 8]
    assert running["holders"][0][1].startswith("node 7 shard 11 (100 lines), lease until ")
    assert re.search(r"\(in (1 min|\d+ s)\)$", running["holders"][0][1])
    assert (fresh["status"], fresh["progress"]) == ("validating", "validating the input file")
    assert fresh["shards"] is None and fresh["ok"] == 0 and fresh["fail"] == 0
    assert fresh["holders"][0][0] == 8 and "validating" in fresh["holders"][0][1]
    # CSP: nothing refused (an inline style attribute would be; CSSOM widths are not).
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    d.find_element("id", "batches").screenshot(str(SCREENSHOTS / "status-page-batches.png"))

    # The batches finish: gone from the list; other keys' running ones are still counted.
    server.body = {**server.body, "batches": {"running": 1, "mine": []}}
    _wait(d, "an empty list", lambda: not d.execute_script(BATCHES_JS))
    assert d.find_element("id", "batches-count").text == "1 at work in all"
    server.body = {**server.body, "batches": {"running": 0, "mine": []}}
    _wait(d, "the section hidden", lambda: not _shown(d))


# ---- Fine-tuning ------------------------------------------------------------------------------

BASE = "Qwen/Qwen2.5-1.5B-Instruct"


def _job(hex_: str, status: str, **over: Any) -> dict[str, Any]:
    return {
        "id": "ftjob-" + hex_ * 24,
        "status": status,
        "model": BASE,
        "suffix": None,
        "fine_tuned_model": None,
        "created_at": NOW - 600,
        "finished_at": None,
        "holder": None,
        "progress": None,
        "checkpoints": 0,
        "trained_tokens": None,
        "error": None,
        **over,
    }


def _progress(step: int, total: int, epoch: int, loss: float) -> dict[str, Any]:
    return {"step": step, "total_steps": total, "train_loss": loss, "valid_loss": None,
            "full_valid_loss": None, "n_epochs": 3, "epoch": epoch}  # fmt: skip


TRAINING = _job(
    "a",
    "running",
    suffix="heady",
    holder={"node": 7, "expires_at": NOW + 100, "attempt": 2},
    progress=_progress(5, 12, 2, 1.25),
    checkpoints=1,
)
WAITING = _job("b", "queued", created_at=NOW - 5)
FAILED = _job(
    "c",
    "failed",
    finished_at=NOW - 300,
    error={"code": "invalid_training_file", "message": "line 3: no assistant message"},
)
DONE = _job(
    "d",
    "succeeded",
    suffix="heady",
    fine_tuned_model=f"ft:{BASE}:heady:heady:" + "d" * 24,
    finished_at=NOW - 60,
    progress=_progress(12, 12, 3, 0.5),
    checkpoints=3,
    trained_tokens=900,
)

JOBS_JS = """
return [...document.querySelectorAll('#ft-list .batch')].map(b => ({
  id: b.dataset.job, status: b.querySelector('.status').textContent,
  progress: b.querySelector('[data-field=progress]').textContent,
  model: (b.querySelector('[data-field=model] code') || {}).textContent || null,
  error: (b.querySelector('[data-field=error]') || {}).textContent || null,
  meta: b.querySelector('.bmeta').textContent,
  ok: (b.querySelector('.bar .ok') || {getBoundingClientRect: () => ({width: -1})})
    .getBoundingClientRect().width,
  fail: b.querySelectorAll('.bar .fail').length,
  bar: b.querySelector('.bar').clientWidth,
  now: b.querySelector('.bar').getAttribute('aria-valuenow'),
  max: b.querySelector('.bar').getAttribute('aria-valuemax'),
  holders: [...b.querySelectorAll('.holders li')].map(h => [Number(h.dataset.node), h.textContent]),
}));
"""


@pytest.mark.timeout(120)
def test_fine_tuning_section_shows_steps_loss_holder_and_outcomes(
    browser: WebDriver, server: _Status
) -> None:
    d = browser
    _sign_in(d, server)
    assert not _shown(d, "ft")  # no `fine_tuning` field (a gateway before issue 19): no section

    mine = [WAITING, TRAINING, DONE, FAILED]  # active newest first, then finished
    server.body = {**server.body, "fine_tuning": {"active": 3, "nodes": [7], "mine": mine}}
    _wait(d, "the fine-tuning section", lambda: _shown(d, "ft"))
    count = d.find_element("id", "ft-count").text
    assert count == "2 active for this key, 3 in all; training on node 7"
    waiting, training, done, failed = d.execute_script(JOBS_JS)
    assert [j["id"] for j in (waiting, training, done, failed)] == [j["id"] for j in mine]

    assert (training["status"], training["progress"]) == (
        "running",
        "step 5 of 12 (41%), epoch 2 of 3, loss 1.2500",
    )
    assert (training["now"], training["max"]) == ("5", "12")
    assert abs(training["ok"] - 5 / 12 * training["bar"]) <= 1.5  # the bar by step
    [(node, text)] = training["holders"]
    assert node == 7 and text.startswith("node 7 training (attempt 2), lease until ")
    assert re.search(r"\(in (1 min|\d+ s)\)$", text)
    assert "suffix heady" in training["meta"] and "1 checkpoint" in training["meta"]
    assert f"base model {BASE}" in training["meta"]

    assert (waiting["status"], waiting["progress"]) == ("queued", "waiting for a training node")
    assert waiting["ok"] == 0 and waiting["holders"] == [] and waiting["model"] is None

    assert (done["status"], done["model"]) == ("succeeded", DONE["fine_tuned_model"])
    assert done["progress"] == "step 12 of 12 (100%), epoch 3 of 3, loss 0.5000"
    assert abs(done["ok"] - done["bar"]) <= 1.5 and done["holders"] == []
    assert "3 checkpoints" in done["meta"] and "finished " in done["meta"]

    assert failed["status"] == "failed" and failed["fail"] == 1 and failed["ok"] == -1
    assert failed["error"] == "invalid_training_file: line 3: no assistant message"
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    d.set_window_size(1280, 1600)  # the four cards whole: a screenshot stops at the viewport
    d.find_element("id", "ft").screenshot(str(SCREENSHOTS / "status-page-fine-tuning.png"))

    # Another key's job still trains: counted, none listed; then nothing runs: hidden.
    server.body = {**server.body, "fine_tuning": {"active": 1, "nodes": [8], "mine": []}}
    _wait(d, "an empty list", lambda: not d.execute_script(JOBS_JS))
    assert (
        d.find_element("id", "ft-count").text
        == "0 active for this key, 1 in all; training on node 8"
    )
    server.body = {**server.body, "fine_tuning": {"active": 0, "nodes": [], "mine": []}}
    _wait(d, "the section hidden", lambda: not _shown(d, "ft"))
