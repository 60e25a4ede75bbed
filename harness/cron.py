"""Local stand-in for Cloudflare's cron triggers: calls the Worker's scheduled() handler on
the period of the first `*/N * * * *` cron in wrangler.toml (wrangler 3's `--test-scheduled`
does not reach Python Workers)."""

from __future__ import annotations

import json
import threading

from heady_shared.schedule import cron_period_s


def cron_loop(gw, crons: list[str], every: float | None, stop: threading.Event) -> None:
    cron = crons[0] if crons else "*/5 * * * *"
    period = every if every is not None else cron_period_s(cron)
    while not stop.wait(period):
        try:
            result = gw.scheduled(cron)
            print(json.dumps({"msg": "local cron tick", "cron": cron, **result}), flush=True)
        except OSError as exc:
            print(json.dumps({"msg": "local cron tick failed", "error": str(exc)}), flush=True)
