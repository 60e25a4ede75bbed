"""The harness itself: `python -m harness.gateway` (what `make gateway` runs) ends promptly on
SIGTERM or SIGINT — the runner and its workerd with it — even when signals arrive back to
back (a signal handler that took a lock could deadlock the main thread on itself)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXIT_WITHIN_S = 12.0  # the runner disposes workerd in ~1 s; stop's first wait allows 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGTERM)])
def test_gateway_exits_promptly_on_a_signal(signals):
    port = free_port()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harness.gateway",
                "--port",
                str(port),
                "--dev-vars",
                os.devnull + ".absent",
                "--persist",
                "",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while b"ready http" not in _read(out) and proc.poll() is None:
                assert time.monotonic() < deadline, _read(out)[-2000:]
                time.sleep(0.2)
            assert proc.poll() is None, _read(out)[-2000:]
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200

            started = time.monotonic()
            for sig in signals:
                proc.send_signal(sig)
            code = proc.wait(timeout=EXIT_WITHIN_S)
            assert time.monotonic() - started < EXIT_WITHIN_S
            assert code == 0, _read(out)[-2000:]
            # nothing of it is left listening: the runner and workerd are gone too
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _read(f) -> bytes:
    f.seek(0)
    return f.read()
