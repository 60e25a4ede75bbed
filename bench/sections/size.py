"""Section 7: large request bodies (1 MiB, 10 MiB): latency and workerd's peak RSS."""

from __future__ import annotations

from bench.client import request
from bench.common import log, median
from bench.context import Bench
from bench.probes import mem_kib
from bench.render import fmt, table
from bench.sections import Section


def _completion_of(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (one long prompt word)."""
    head, tail = b'{"model":"reasoning","max_tokens":1,"prompt":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def run(bench: Bench) -> dict[tuple[str, int], dict]:
    out = {}
    targets = [bench.target(n) for n in ("direct", "bare-py", "gateway")]
    for size in bench.profile.sizes:
        body = _completion_of(size)
        for t in targets:
            hwm0 = mem_kib(t.workerd, "VmHWM")
            lat, statuses = [], []
            for _ in range(bench.profile.size_reps):
                st, _, _, secs = request(t.post_url, "POST", body, t.auth, timeout=120)
                lat.append(secs * 1000)
                statuses.append(st)
            out[(t.name, size)] = {
                "p50": median(lat),
                "max": max(lat),
                "statuses": sorted(set(statuses)),
                "hwm_before": hwm0,
                "hwm_after": mem_kib(t.workerd, "VmHWM"),
            }
            log(f"size {size >> 20} MiB {t.name:>16} p50 {median(lat):.1f} ms status {statuses}")
    return out


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f}"


def render(res: dict[tuple[str, int], dict], bench: Bench) -> list[str]:
    rows = [
        [
            n,
            f"{size >> 20} MiB",
            fmt(s["p50"]),
            fmt(s["max"]),
            ",".join(map(str, s["statuses"])),
            f"{_mib(s['hwm_before'])} → {_mib(s['hwm_after'])}",
        ]
        for (n, size), s in res.items()
    ]
    header = [
        "target",
        "body",
        "p50 ms",
        "max ms",
        "status",
        "workerd peak RSS (VmHWM) before → after MiB",
    ]
    return table(header, rows, {1, 2, 3})


SECTION = Section(
    7,
    "size",
    "Request size (1 MiB and 10 MiB bodies)",
    run,
    lambda r, b: [SECTION.heading, "", *render(r, b)],
    needs=("direct", "bare-py", "gateway"),
)
