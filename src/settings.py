"""Every Worker var and secret, declared once: name, default, bounds and what it does.

From this table come the keys the shell reads from `env`, the validation in config.py, the
`[vars]` block of wrangler.toml and the table in docs/configuration.md (tests/unit/
test_settings.py keeps both files in sync with it). To add a setting: add a row, read it in
config.load_config, run the test and paste what it prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from heady_shared.routes import NODE_NUMBERS, endpoint_key

Kind = Literal["number", "text", "secret"]


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    kind: Kind
    doc: str
    default: float | str | None = None
    lo: float | None = None
    hi: float | None = None
    in_wrangler: bool = False  # listed in wrangler.toml [vars] with its default


SETTINGS: tuple[Setting, ...] = (
    *(
        Setting(endpoint_key(n), "secret", f"Node {n}'s tunnel URL (https://...)")
        for n in NODE_NUMBERS
    ),
    Setting("GATEWAY_API_KEYS", "secret", "Client keys, comma-separated (Bearer or x-api-key)"),
    Setting("NODE_TOKEN", "secret", "Sent to nodes as `Authorization: Bearer` (vLLM --api-key)"),
    Setting("AUTH_DISABLED", "text", "`true` turns client auth off (local use only)"),
    Setting(
        "ROUTES",
        "text",
        'Role pairs and fallback chain, JSON: `{"roles": {"code": [3, 4]}, "fallback": [1, 2]}`',
    ),
    Setting(
        "UPSTREAM_PATHS",
        "text",
        "Comma-separated path prefixes forwarded to nodes; anything else is a 404",
        "/v1/",
        in_wrangler=True,
    ),
    Setting(
        "CORS_ORIGINS",
        "text",
        "Allowed browser origins, comma-separated, or `*`",
        "*",
        in_wrangler=True,
    ),
    Setting(
        "ATTEMPT_TIMEOUT_S",
        "number",
        "Seconds a node has to send its response head, counted from the end of the upload",
        120.0,
        1,
        3600,
        True,
    ),
    Setting(
        "ROLE_TIMEOUTS_S",
        "text",
        'Per-role attempt time-outs, JSON seconds 1..3600: `{"batch": 600}`',
        '{"batch": 600}',
        in_wrangler=True,
    ),
    Setting(
        "UPLOAD_TIMEOUT_S",
        "number",
        "Seconds a client has to finish sending its request body",
        60.0,
        1,
        3600,
        True,
    ),
    Setting(
        "DEADLINE_S",
        "number",
        "Seconds for a whole request, all attempts together",
        900.0,
        1,
        7200,
        True,
    ),
    Setting(
        "MAX_BODY_BYTES",
        "number",
        "Largest request body accepted (413 above)",
        10485760,
        0,
        104857600,
        True,
    ),
    Setting("MAX_ATTEMPTS", "number", "Nodes tried per request at most", 4, 1, 8, True),
    Setting(
        "COOLDOWN_BASE_S",
        "number",
        "First cooldown of a failed node (doubles per failure)",
        30.0,
        1,
        3600,
    ),
    Setting("COOLDOWN_MAX_S", "number", "Longest cooldown", 600.0, 1, 86400),
    Setting(
        "STABLE_AFTER_S",
        "number",
        "Up this long, a node's failure count starts again",
        1800.0,
        0,
        86400,
    ),
    Setting(
        "HEALTH_REFRESH_S", "number", "An isolate re-reads KV at most this often", 30.0, 1, 3600
    ),
    Setting(
        "KV_MIN_WRITE_INTERVAL_S",
        "number",
        "An isolate writes KV at most this often",
        120.0,
        1,
        86400,
    ),
    Setting(
        "KV_TIMEOUT_S", "number", "A KV read or write taking longer is given up", 1.0, 0.05, 30
    ),
    Setting("HEALTH_PATH", "text", "Probe path on each node", "/health", in_wrangler=True),
    Setting(
        "METRICS_PATH",
        "text",
        "Load (queue depth) path on each node; empty: none",
        "/metrics",
        in_wrangler=True,
    ),
    Setting("PROBE_TIMEOUT_S", "number", "Seconds per cron probe", 5.0, 0.5, 60),
    Setting(
        "PROBE_UP_EVERY_S",
        "number",
        "Healthy nodes are probed this sparsely (ngrok budget)",
        1800.0,
        60,
        86400,
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}
CONFIG_KEYS = tuple(BY_NAME)


def wrangler_vars() -> dict[str, str]:
    """The [vars] block wrangler.toml must carry."""
    return {s.name: _text(s.default) for s in SETTINGS if s.in_wrangler}


def docs_table() -> str:
    """The Markdown table of docs/configuration.md."""
    rows = ["| name | kind | default | range | what it does |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        rng = f"{_text(s.lo)}..{_text(s.hi)}" if s.lo is not None else ""
        default = f"`{_text(s.default)}`" if s.default is not None else ""
        rows.append(f"| `{s.name}` | {s.kind} | {default} | {rng} | {s.doc} |")
    return "\n".join(rows) + "\n"


def _text(value: float | str | None) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)
