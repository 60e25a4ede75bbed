"""For tests that run real processes and servers on this machine: a stdlib HTTP server served
from a thread for the block, polling until a condition holds, whether a process is alive."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from socketserver import BaseServer


@contextmanager
def serving[S: BaseServer](server: S) -> Iterator[S]:
    """`server` answers from a daemon thread inside the block, then is shut down and closed."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def wait_for(check: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
