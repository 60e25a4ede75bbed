"""One generation at a time per GPU, a bounded wait, and the gauges that say so.

A diffusion call holds the GPU for its whole duration, so running two at once only makes both
slower (and risks running out of memory next to vLLM). Requests past the bound are refused at
once with 429 and a `Retry-After` the gateway honours (it fails over to the other node of the
pair): waiting longer than that would run into Cloudflare's 100 s origin time-out anyway.

The gauges are named the way vLLM names its own (`vllm:num_requests_running`,
`vllm:num_requests_waiting`, vllm/v1/metrics/loggers.py), with this engine's prefix, so
heady_shared.metrics reads the image queue next to vLLM's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from heady_shared import capabilities
from heady_shared.metrics import IMAGES_WAITING

T = TypeVar("T")

PREFIX = "heady_images"
RUNNING = f"{PREFIX}:num_requests_running"
WAITING = IMAGES_WAITING  # heady_shared.metrics counts it in the node's queue depth
MAX_RETRY_AFTER_S = 600


def retry_after_s(running: int, waiting: int, seconds_per_job: float) -> int:
    """Whole seconds until the queue has drained, at least 1, at most MAX_RETRY_AFTER_S."""
    est = (running + waiting) * max(seconds_per_job, 0.0)
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(est)))


def moving_average(old: float, sample: float, weight: float = 0.2) -> float:
    """Seconds per job, learnt from the jobs that ran (the preset's estimate is the start)."""
    return sample if old <= 0 else old + weight * (sample - old)


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"image queue full, retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass
class JobQueue:
    """FIFO admission to one worker. `run` either runs `fn` in the worker thread when its turn
    comes or raises QueueFull at once; cancelling a waiting `run` frees its place."""

    max_waiting: int
    seconds_per_job: float  # current estimate (starts as the preset's)
    clock: Callable[[], float] = time.monotonic
    running: int = 0
    waiting: int = 0
    done: int = 0
    failed: int = 0
    rejected: int = 0
    busy_s: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def retry_after(self) -> int:
        return retry_after_s(self.running, self.waiting, self.seconds_per_job)

    async def run(self, fn: Callable[[], T], cost: float = 1.0) -> T:
        """`cost`: this job's size in units of seconds_per_job (e.g. the number of images)."""
        if self._lock.locked() and self.waiting >= self.max_waiting:
            self.rejected += 1
            raise QueueFull(self.retry_after())
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        self.running = 1
        started = self.clock()

        def finished(fut: asyncio.Future) -> None:
            # Runs when the worker thread is done, even if the caller was cancelled meanwhile:
            # a thread cannot be stopped, so the GPU stays "running" until it really is free.
            took = self.clock() - started
            self.busy_s += took
            if fut.cancelled() or fut.exception() is not None:
                self.failed += 1
            else:
                self.done += 1
                self.seconds_per_job = moving_average(self.seconds_per_job, took / max(cost, 1e-9))
            self.running = 0
            self._lock.release()

        fut = asyncio.ensure_future(asyncio.to_thread(fn))
        fut.add_done_callback(finished)
        return await asyncio.shield(fut)

    def metrics(self, model: str, ready: bool) -> str:
        """Prometheus text: the queue gauges, counters, and the capability once ready."""
        label = f'{{model_name="{_label(model)}"}}'
        rows = [
            (RUNNING, "gauge", "Image generations running on the GPU (at most 1).", self.running),
            (WAITING, "gauge", "Image requests waiting for the GPU.", self.waiting),
            (
                f"{PREFIX}:max_num_requests_waiting",
                "gauge",
                "Waiting requests past which new ones get 429.",
                self.max_waiting,
            ),
            (
                f"{PREFIX}:seconds_per_image",
                "gauge",
                "Current estimate of seconds per image (moving average).",
                round(self.seconds_per_job, 4),
            ),
            (f"{PREFIX}:request_success_total", "counter", "Finished requests.", self.done),
            (f"{PREFIX}:request_failure_total", "counter", "Failed requests.", self.failed),
            (f"{PREFIX}:request_rejected_total", "counter", "Refused (429).", self.rejected),
            (f"{PREFIX}:busy_seconds_total", "counter", "GPU seconds.", round(self.busy_s, 3)),
        ]  # fmt: skip
        out = []
        for name, kind, text, value in rows:
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name}{label} {value}"]
        text = "\n".join(out) + "\n"
        if ready:
            # No HELP/TYPE: the node guard puts this after its own capability lines.
            text += capabilities.exposition((capabilities.IMAGE_GENERATION,), header=False)
        return text


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
