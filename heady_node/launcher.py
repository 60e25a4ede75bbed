"""Start the serving engine, wait until it is healthy, stop it and everything it spawned."""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from heady_node.guard import MARK_HEADER


class EngineError(RuntimeError):
    """The engine died or never became healthy; the message carries its log tail."""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


def spawn(
    argv: list[str], *, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Own process group, so stop() also reaches workers vLLM forks; output goes to a file
    (a pipe nobody reads would fill up and block the engine)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def stop(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM the engine's whole process group, SIGKILL whatever is left after `grace` s."""
    pgid = proc.pid  # spawn() made the child a session (and group) leader
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid)):
        time.sleep(0.1)
    if proc.poll() is None or _group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
    return proc.poll()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_healthy(
    base_url: str,
    proc: subprocess.Popen,
    *,
    log_path: Path,
    timeout: float,
    interval: float = 1.0,
    probe: Callable[[str], bool] | None = None,
    on_wait: Callable[[float], None] | None = None,
) -> float:
    """Poll GET /health until 200; returns seconds waited. Raises EngineError with the log tail
    when the process exits or `timeout` passes (the caller decides whether to stop it)."""
    check = probe or _http_health
    start = time.monotonic()
    last_note = start
    while True:
        code = proc.poll()
        if code is not None:
            raise EngineError(
                f"engine exited with code {code} before becoming healthy; log tail:\n"
                + log_tail(log_path)
            )
        if check(base_url):
            return time.monotonic() - start
        now = time.monotonic()
        if now - start >= timeout:
            raise EngineError(
                f"engine not healthy after {timeout:.0f}s at {base_url}/health; log tail:\n"
                + log_tail(log_path)
            )
        if on_wait and now - last_note >= 30:
            last_note = now
            on_wait(now - start)
        time.sleep(min(interval, max(0.05, timeout - (now - start))))


def _http_health(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def smoke_test(base_url: str, api_key: str, model: str, timeout: float = 120.0) -> str:
    """One tiny chat completion with the node token: proves --api-key and the model work."""
    resp = httpx.post(
        f"{base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Say OK."}],
            "max_tokens": 8,
        },
        timeout=timeout,
    )
    if resp.status_code != 200:
        raise EngineError(f"smoke test got HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        return str(resp.json()["choices"][0]["message"]["content"]).strip()
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise EngineError(f"smoke test got an unexpected body: {resp.text[:200]}") from exc


# A path vLLM serves (GET /version) that the guard must hide: its 404 must carry the guard's mark.
GUARD_PROBE_PATH = "/version"


def guard_active(base_url: str) -> bool:
    """True when the node guard answers for paths outside the published API."""
    try:
        resp = httpx.get(f"{base_url}{GUARD_PROBE_PATH}", timeout=10.0)
    except httpx.HTTPError:
        return False
    return resp.status_code == 404 and resp.headers.get(MARK_HEADER) == "1"
