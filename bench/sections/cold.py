"""Section 5: cold start, from process start to the first 200 on the small POST. The first
sample of each Worker is the start of its long-lived instance; the rest are fresh starts."""

from __future__ import annotations

from bench.common import log, median
from bench.context import Bench
from bench.render import fmt, table
from bench.sections import Section


def run(bench: Bench) -> dict[str, list[float]]:
    for _ in range(bench.profile.cold_reps - 1):
        for name, variant in bench.variants.items():
            t = variant.start()
            t.stop()
            bench.target(name).cold_start_s.extend(t.cold_start_s)
            log(f"cold start {name}: {t.cold_start_s[0]:.2f} s")
    return {t.name: list(t.cold_start_s) for t in bench.targets if t.cold_start_s}


def render(cold: dict[str, list[float]], bench: Bench) -> list[str]:
    rows = [[n, fmt(median(v)), ", ".join(f"{x:.2f}" for x in v)] for n, v in cold.items()]
    return table(["target", "median s", "samples"], rows, {1})


SECTION = Section(
    5,
    "cold",
    "Cold start (process start to first 200 on the small POST)",
    run,
    lambda r, b: [SECTION.heading, "", *render(r, b)],
    needs=("bare-py", "gateway"),
)
