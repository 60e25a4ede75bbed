"""heady_shared.schedule: the cron period from the Worker's cron expression."""

from __future__ import annotations

import pytest

from heady_shared.schedule import UNKNOWN_PERIOD_S, cron_period_s

# ---- cron schedule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "period"),
    [
        ("*/5 * * * *", 300.0),
        ("*/1 * * * *", 60.0),
        ("*/30 * * * *", 1800.0),
        ("*/60 * * * *", 3600.0),
        ("* * * * *", 60.0),
        ("  */10   *  *  *  *  ", 600.0),
        ("5 * * * *", 3600.0),
        ("0 * * * *", 3600.0),
        # anything else counts as a day: probing healthy nodes too often, never too rarely
        ("*/0 * * * *", UNKNOWN_PERIOD_S),
        ("*/61 * * * *", UNKNOWN_PERIOD_S),
        ("*/x * * * *", UNKNOWN_PERIOD_S),
        ("*/5 1 * * *", UNKNOWN_PERIOD_S),
        ("*/5 * * *", UNKNOWN_PERIOD_S),
        ("0,30 * * * *", UNKNOWN_PERIOD_S),
        ("60 * * * *", UNKNOWN_PERIOD_S),
        ("", UNKNOWN_PERIOD_S),
        (None, UNKNOWN_PERIOD_S),
        ("garbage", UNKNOWN_PERIOD_S),
    ],
)
def test_cron_period(cron, period):
    assert UNKNOWN_PERIOD_S == 86400.0
    assert cron_period_s(cron) == period
