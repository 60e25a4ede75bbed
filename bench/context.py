"""One benchmark run's shared state: profile, load generator, fleet, running targets, and
measurements that several sections read (computed once)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.common import Profile
from bench.loadgen import LoadGen
from bench.targets import Target, Variant
from sim.fleet import FleetProcess

T = TypeVar("T")


@dataclass
class Options:
    chaos_s: float | None = None  # override the profile's chaos seconds
    chaos_conns: int = 8
    chaos_seed: int = 1
    memory_requests: int | None = None  # override the profile's requests per target
    memory_logs: bool = False  # also measure gateway with workerLogs on, bare-py with a log line
    memory_src: bool = False  # also measure each --src gateway tree


@dataclass
class Bench:
    profile: Profile
    gen: LoadGen
    fleet: FleetProcess
    targets: list[Target]  # direct, bare-js, bare-py, gateway, gateway[LABEL]...
    variants: dict[str, Variant]  # how to start each Python Worker target again
    options: Options = field(default_factory=Options)
    _memo: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    def once(self, key: str, measure: Callable[[], T]) -> T:
        """A measurement several sections share (e.g. the load runs feed latency, CPU, KV)."""
        if key not in self._memo:
            self._memo[key] = measure()
        return self._memo[key]
