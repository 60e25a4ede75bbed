"""How often a cron expression fires, for the forms the gateway's health checks use."""

from __future__ import annotations

UNKNOWN_PERIOD_S = 86400.0


def cron_period_s(cron: str | None) -> float:
    """Seconds between cron runs for '* * * * *', '*/N * * * *' and 'M * * * *' (hourly).

    Any other form counts as a day: overestimating the period only means healthy nodes are
    probed on every run (more probes), while underestimating it could skip their slot forever.
    """
    fields = (cron or "").split()
    if len(fields) != 5 or any(f != "*" for f in fields[1:]):
        return UNKNOWN_PERIOD_S
    minute = fields[0]
    if minute == "*":
        return 60.0
    if minute.startswith("*/") and minute[2:].isdigit() and 0 < int(minute[2:]) <= 60:
        return 60.0 * int(minute[2:])
    if minute.isdigit() and int(minute) < 60:
        return 3600.0
    return UNKNOWN_PERIOD_S
