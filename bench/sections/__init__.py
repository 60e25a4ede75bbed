"""The benchmark's sections, in the order of bench/results.md.

Each section measures (`run`, given the run's `Bench`) and renders its own markdown (`render`,
a list of lines starting with its `## N. title` heading). Select them with `--sections` by
number or key, e.g. `--sections 1,cpu,memory`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.context import Bench


@dataclass(frozen=True)
class Section:
    number: int
    key: str
    title: str
    run: Callable[[Bench], Any]
    render: Callable[[Any, Bench], list[str]]
    # the long-lived targets it measures ("gateway" includes every gateway[LABEL])
    needs: tuple[str, ...] = ("direct", "bare-js", "bare-py", "gateway")

    @property
    def heading(self) -> str:
        return f"## {self.number}. {self.title}"


def all_sections() -> list[Section]:
    from bench.sections import batch, chaos, cold, failover, kv, load, memory, size, streaming

    return [
        load.LATENCY,
        streaming.SECTION,
        failover.SECTION,
        load.CPU,
        cold.SECTION,
        kv.SECTION,
        size.SECTION,
        memory.SECTION,
        chaos.SECTION,
        batch.SECTION,
        batch.CHAOS,
    ]


def select(spec: str) -> list[Section]:
    """`1,4` or `latency,cpu` (or a mix); `all` for every section."""
    sections = all_sections()
    if spec.strip() == "all":
        return sections
    wanted = {x.strip() for x in spec.split(",") if x.strip()}
    known = {str(s.number) for s in sections} | {s.key for s in sections}
    if unknown := wanted - known:
        choices = ", ".join(f"{s.number}={s.key}" for s in sections)
        raise ValueError(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {choices}")
    return [s for s in sections if str(s.number) in wanted or s.key in wanted]
