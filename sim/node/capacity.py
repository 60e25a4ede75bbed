"""A node's capacity: how many completions run at once and how long each token takes.

vLLM's scheduler runs at most ``--max-num-seqs`` sequences per iteration ("Maximum number of
sequences to be processed in a single iteration", SchedulerConfig.max_num_seqs in
docs.vllm.ai/en/latest/configuration/engine_args.html); a request beyond it waits in the
scheduler's FIFO queue (vllm/v1/core/sched/scheduler.py: ``waiting``, admitted while
``len(running) < max_num_seqs``) and counts in ``vllm:num_requests_waiting`` until admitted.
Decoding is memory-bound: one iteration yields one token for every running sequence in about
the same time whatever the batch size, so a sequence's tokens arrive ``token_s`` apart and
throughput grows with concurrency up to ``max_num_seqs``, then saturates.

The defaults (no limit, no token time) are the simulator as it always was: every request runs
at once and answers without delay.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sim.node.modes import number

__all__ = ["UNLIMITED", "Capacity", "Scheduler", "parse_capacity"]


@dataclass(frozen=True, slots=True)
class Capacity:
    max_num_seqs: int | None = None  # None: no limit
    token_s: float = 0.0  # seconds per generated token of one sequence

    def to_dict(self) -> dict[str, Any]:
        return {"max_num_seqs": self.max_num_seqs, "token_s": self.token_s}


UNLIMITED = Capacity()


def parse_capacity(params: Mapping[str, Any], base: Capacity = UNLIMITED) -> Capacity:
    """``base`` with the given ``max_num_seqs`` (a positive integer or None) and/or ``token_s``
    (seconds, >= 0) replaced; raises ValueError with a readable message."""
    params = dict(params)
    seqs = params.pop("max_num_seqs", base.max_num_seqs)
    token_s = params.pop("token_s", base.token_s)
    if params:
        raise ValueError(f"capacity takes no parameter(s) {', '.join(sorted(params))}")
    if seqs is not None:
        seqs = int(number("max_num_seqs", seqs, integer=True))
        if seqs < 1:
            raise ValueError("max_num_seqs must be at least 1 (or null for no limit)")
    return Capacity(seqs, number("token_s", token_s))


class Scheduler:
    """Admission in arrival order: ``running`` completions hold a slot, ``waiting`` ones queue
    for one. Runs on the node's event loop; the counters may be read from any thread."""

    def __init__(self, capacity: Capacity = UNLIMITED) -> None:
        self.capacity = capacity
        self.running = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _free(self) -> bool:
        limit = self.capacity.max_num_seqs
        return limit is None or self.running < limit

    async def admit(self) -> None:
        """Return once this request holds a slot (at once while one is free and none waits)."""
        if self._free() and not self._queue:
            self.running += 1
            return
        slot = asyncio.get_running_loop().create_future()
        self._queue.append(slot)
        try:
            await slot  # the slot is counted in `running` by whoever resolved it
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self.release()  # granted, then the client left before using it
            elif slot in self._queue:
                self._queue.remove(slot)
            raise

    def release(self) -> None:
        self.running -= 1
        self._wake()

    def set_capacity(self, capacity: Capacity) -> None:
        """A raised limit admits waiting requests at once; a lowered one lets the running
        finish and admits no more until they are under it."""
        self.capacity = capacity
        self._wake()

    def _wake(self) -> None:
        while self._queue and self._free():
            slot = self._queue.popleft()
            if not slot.done():
                self.running += 1
                slot.set_result(None)
