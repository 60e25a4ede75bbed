"""Every Worker var and secret, declared once: name, kind, default, bounds, where it lands and
what it does.

From this table come the keys the shell reads from `env`, how each value is read and checked
(the parser of its kind, below), the config field it fills (`config.load_config` loops over
the table), the defaults of config's dataclasses, the `[vars]` block of wrangler.toml and the
table in docs/configuration.md (tests/unit/test_settings.py keeps both files in sync with it).

To add a setting: add a row (and the field it fills, defaulting to `DEFAULTS[name]`), run
tests/unit/test_settings.py and paste what it prints.

Pure and stdlib only. A parser never raises and never quotes a secret: a bad value is replaced
by the default and reported as a problem (ROUTES: as fatal, the gateway cannot route without it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from heady_shared.endpoints import parse_endpoint
from heady_shared.probes import (
    DEFAULT_HEALTH_PATH,
    DEFAULT_METRICS_PATH,
    parse_optional_path,
    parse_path,
)
from heady_shared.routes import NODE_NUMBERS, endpoint_key, parse_routes

Kind = Literal[
    "endpoint",  # secret: a node's tunnel URL (heady_shared.endpoints decides)
    "keys",  # secret: comma- or newline-separated client keys
    "token",  # secret: one value sent in a header
    "flag",  # 1/true/yes/on, anything else is off
    "routes",  # the JSON route table (heady_shared.routes decides)
    "paths",  # comma-separated absolute paths or path prefixes
    "origins",  # comma-separated browser origins, or *
    "number",  # a number within lo..hi
    "integer",  # a number within lo..hi, truncated to an int
    "seconds by role",  # JSON object: role -> seconds within lo..hi
    "path",  # an absolute path
    "path or empty",  # an absolute path; empty: none
    "node numbers",  # comma-separated node numbers 1..8; empty: none named
    "choice",  # one of the row's `choices`
]
SECRET_KINDS: frozenset[Kind] = frozenset({"endpoint", "keys", "token"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    name: str
    kind: Kind
    # The config field it fills: a GatewayConfig field, "timeouts.<field>", "health.<field>",
    # "batch.<field>" (jobdb.BatchSettings), "finetune.<field>" (finetune.FtSettings), or
    # "nodes.<n>" (node n's slot).
    into: str
    doc: str
    default: str | None = None  # as the Worker would receive it in env; None: unset
    lo: float | None = None
    hi: float | None = None
    in_wrangler: bool = False  # listed in wrangler.toml [vars] with its default
    choices: tuple[str, ...] = ()  # kind "choice": the values allowed

    @property
    def secret(self) -> bool:
        return self.kind in SECRET_KINDS

    def read(self, raw: object, found: Findings) -> Any:
        """The value of this setting given its raw env value (None: unset)."""
        return PARSERS[self.kind](self, None if raw is None else str(raw), found)


@dataclass(slots=True)
class Findings:
    problems: list[str] = field(default_factory=list)  # non-fatal: reported in /api/status
    fatal: list[str] = field(default_factory=list)  # the gateway cannot route at all


SETTINGS: tuple[Setting, ...] = (
    *(
        Setting(
            name=endpoint_key(n),
            kind="endpoint",
            into=f"nodes.{n}",
            doc=f"Node {n}'s tunnel URL (https://...)",
        )
        for n in NODE_NUMBERS
    ),
    Setting(
        name="GATEWAY_API_KEYS",
        kind="keys",
        into="api_keys",
        doc="Client keys, comma-separated (Bearer or x-api-key)",
    ),
    Setting(
        name="NODE_TOKEN",
        kind="token",
        into="node_token",
        doc="Sent to nodes as `Authorization: Bearer` (vLLM --api-key)",
    ),
    Setting(
        name="AUTH_DISABLED",
        kind="flag",
        into="auth_disabled",
        doc="`true` turns client auth off (local use only)",
    ),
    Setting(
        name="ROUTES",
        kind="routes",
        into="pools",
        doc=(
            'Role pairs and fallback chain, JSON: `{"roles": {"code": [3, 4]}, "fallback": [1, 2]}`'
        ),
    ),
    Setting(
        name="UPSTREAM_PATHS",
        kind="paths",
        into="upstream_paths",
        doc="Comma-separated path prefixes forwarded to nodes; anything else is a 404",
        default="/v1/",
        in_wrangler=True,
    ),
    Setting(
        name="CORS_ORIGINS",
        kind="origins",
        into="cors_origins",
        doc="Allowed browser origins, comma-separated, or `*`",
        default="*",
        in_wrangler=True,
    ),
    Setting(
        name="ATTEMPT_TIMEOUT_S",
        kind="number",
        into="timeouts.attempt_s",
        doc="Seconds a node has to send its response head, counted from the end of the upload",
        default="120",
        lo=1,
        hi=3600,
        in_wrangler=True,
    ),
    Setting(
        name="ROLE_TIMEOUTS_S",
        kind="seconds by role",
        into="timeouts.per_role_attempt_s",
        doc=(
            'Per-role attempt time-outs, JSON seconds: `{"batch": 100}` (a node behind a '
            "Cloudflare tunnel that sends no head within ~100 s is cut off by the edge anyway)"
        ),
        default='{"batch": 100}',
        lo=1,
        hi=3600,
        in_wrangler=True,
    ),
    Setting(
        name="UPLOAD_TIMEOUT_S",
        kind="number",
        into="timeouts.upload_s",
        doc="Seconds a client has to finish sending its request body",
        default="60",
        lo=1,
        hi=3600,
        in_wrangler=True,
    ),
    Setting(
        name="DEADLINE_S",
        kind="number",
        into="timeouts.deadline_s",
        doc="Seconds for a whole request, all attempts together",
        default="900",
        lo=1,
        hi=7200,
        in_wrangler=True,
    ),
    Setting(
        name="STREAM_RELAY",
        kind="choice",
        into="stream_relay",
        doc=(
            "How event streams and chunked bodies are relayed: `native` (pumped by the runtime, "
            "no Worker CPU per event; the final error event needs workerd v1.20260619 or later, "
            "as production runs) or `guarded` (a JS TransformStream: the error event on any "
            "runtime, ~0.2 ms CPU per event)"
        ),
        default="native",
        choices=("native", "guarded"),
        in_wrangler=True,
    ),
    Setting(
        name="STREAM_IDLE_S",
        kind="number",
        into="timeouts.stream_idle_s",
        doc=(
            "A streamed answer whose node sends nothing this long ends with an `upstream_idle` "
            "error event and counts against the node; 0: no limit"
        ),
        default="60",
        lo=0,
        hi=3600,
        in_wrangler=True,
    ),
    Setting(
        name="MAX_BODY_BYTES",
        kind="integer",
        into="max_body_bytes",
        doc="Largest request body accepted (413 above)",
        default="10485760",
        lo=0,
        hi=104857600,
        in_wrangler=True,
    ),
    Setting(
        name="MAX_ATTEMPTS",
        kind="integer",
        into="max_attempts",
        doc="Nodes tried per request at most",
        default="4",
        lo=1,
        hi=8,
        in_wrangler=True,
    ),
    Setting(
        name="COOLDOWN_BASE_S",
        kind="number",
        into="health.cooldown_base_s",
        doc="First cooldown of a failed node (doubles per failure)",
        default="30",
        lo=1,
        hi=3600,
    ),
    Setting(
        name="COOLDOWN_MAX_S",
        kind="number",
        into="health.cooldown_max_s",
        doc="Longest cooldown",
        default="600",
        lo=1,
        hi=86400,
    ),
    Setting(
        name="STABLE_AFTER_S",
        kind="number",
        into="health.stable_after_s",
        doc="Up this long, a node's failure count starts again",
        default="1800",
        lo=0,
        hi=86400,
    ),
    Setting(
        name="HEALTH_REFRESH_S",
        kind="number",
        into="health.refresh_s",
        doc="An isolate re-reads KV at most this often",
        default="30",
        lo=1,
        hi=3600,
    ),
    Setting(
        name="KV_MIN_WRITE_INTERVAL_S",
        kind="number",
        into="health.min_write_interval_s",
        doc="An isolate writes KV at most this often",
        default="120",
        lo=1,
        hi=86400,
    ),
    Setting(
        name="KV_TIMEOUT_S",
        kind="number",
        into="health.kv_timeout_s",
        doc="A KV read or write taking longer is given up",
        default="1",
        lo=0.05,
        hi=30,
    ),
    Setting(
        name="HEALTH_PATH",
        kind="path",
        into="health.probe_path",
        doc="Probe path on each node",
        default=DEFAULT_HEALTH_PATH,
        in_wrangler=True,
    ),
    Setting(
        name="METRICS_PATH",
        kind="path or empty",
        into="health.metrics_path",
        doc="Load (queue depth) path on each node; empty: none",
        default=DEFAULT_METRICS_PATH,
        in_wrangler=True,
    ),
    Setting(
        name="PROBE_TIMEOUT_S",
        kind="number",
        into="health.probe_timeout_s",
        doc="Seconds per cron probe",
        default="5",
        lo=0.5,
        hi=60,
    ),
    Setting(
        name="PROBE_UP_EVERY_S",
        kind="number",
        into="health.probe_up_every_s",
        doc="Healthy nodes are probed this sparsely (ngrok budget)",
        default="1800",
        lo=60,
        hi=86400,
    ),
    Setting(
        name="NODE_SECRET",
        kind="token",
        into="node_secret",
        doc="Nodes' batch credentials derive from it (`heady_shared.nodeauth`); unset: no node API",
    ),
    Setting(
        name="MAX_FILE_BYTES",
        kind="integer",
        into="batch.max_file_bytes",
        doc="Largest upload (`/v1/files`) and batch result part (413 above, before reading)",
        default="100000000",
        lo=1024,
        hi=5_000_000_000,
        in_wrangler=True,
    ),
    Setting(
        name="SHARD_LINES",
        kind="integer",
        into="batch.shard_lines",
        doc="Lines per batch shard (the unit a node leases)",
        default="100",
        lo=1,
        hi=50_000,
        in_wrangler=True,
    ),
    Setting(
        name="BATCH_LEASE_S",
        kind="number",
        into="batch.lease_s",
        doc="A shard's lease lapses this long after its node's last heartbeat",
        default="120",
        lo=1,
        hi=3600,
        in_wrangler=True,
    ),
    Setting(
        name="BATCH_HEARTBEAT_S",
        kind="number",
        into="batch.heartbeat_s",
        doc="How often a node heartbeats its lease (below BATCH_LEASE_S)",
        default="30",
        lo=0.2,
        hi=1800,
        in_wrangler=True,
    ),
    Setting(
        name="BATCH_HELPERS",
        kind="flag",
        into="batch.helpers",
        doc="`true`: idle nodes of other roles may lease shards of models they serve",
        default="false",
        in_wrangler=True,
    ),
    Setting(
        name="TRAIN_NODES",
        kind="node numbers",
        into="train_nodes",
        doc="Nodes that may lease fine-tuning jobs, comma-separated; empty: the `batch` pair",
        default="",
        in_wrangler=True,
    ),
    Setting(
        name="FT_LEASE_S",
        kind="number",
        into="finetune.lease_s",
        doc="A training lease lapses this long after its node's last heartbeat (then resumed)",
        default="120",
        lo=5,
        hi=3600,
        in_wrangler=True,
    ),
    Setting(
        name="FT_HEARTBEAT_S",
        kind="number",
        into="finetune.heartbeat_s",
        doc="How often a training node heartbeats (below FT_LEASE_S)",
        default="30",
        lo=0.2,
        hi=1800,
        in_wrangler=True,
    ),
    Setting(
        name="FT_MAX_UPLOAD_BYTES",
        kind="integer",
        into="finetune.max_blob_bytes",
        doc="Largest checkpoint or adapter upload from a training node (413 above)",
        default="100000000",
        lo=1024,
        hi=5_000_000_000,
        in_wrangler=True,
    ),
    Setting(
        name="FT_MAX_ATTEMPTS",
        kind="integer",
        into="finetune.max_attempts",
        doc="Leases of one fine-tuning job before it fails as `training_interrupted`",
        default="5",
        lo=1,
        hi=100,
        in_wrangler=True,
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}
CONFIG_KEYS = tuple(BY_NAME)


# ---- parsers: (setting, raw value or None, findings) -> value; one per kind -------------------

Parser = Callable[[Setting, "str | None", Findings], Any]


def _blank(raw: str | None) -> bool:
    return raw is None or not raw.strip()


def _endpoint(spec: Setting, raw: str | None, found: Findings) -> Any:
    ep = parse_endpoint(raw)
    if ep.state == "invalid":
        found.problems.append(f"{spec.name}: {ep.reason}")  # the reason never quotes the URL
    return ep


def _keys(spec: Setting, raw: str | None, found: Findings) -> tuple[str, ...]:
    return tuple(k.strip() for k in (raw or "").replace("\n", ",").split(",") if k.strip())


def _token(spec: Setting, raw: str | None, found: Findings) -> str | None:
    token = (raw or "").strip() or None
    if token is not None and any(ord(c) < 0x20 or ord(c) > 0x7E for c in token):
        found.problems.append(f"{spec.name}: contains characters not allowed in a header; not sent")
        return None
    return token


def _flag(spec: Setting, raw: str | None, found: Findings) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


def _routes(spec: Setting, raw: str | None, found: Findings) -> Any:
    pools, errors = parse_routes(raw)
    found.fatal.extend(errors)
    return pools


def _paths(spec: Setting, raw: str | None, found: Findings) -> tuple[str, ...]:
    """Absolute paths: "/v1/" forwards everything below /v1, "/tokenize" only that path."""
    if _blank(raw):
        return DEFAULTS[spec.name]
    out = []
    for item in (p.strip() for p in str(raw).split(",")):
        if not item:
            continue
        ok = (
            item.startswith("/")
            and item != "/"
            and "//" not in item
            and all(seg not in (".", "..") for seg in item.split("/"))
            and all(c.isascii() and (c.isalnum() or c in "/-_.") for c in item)
        )
        if not ok:
            found.problems.append(f"{spec.name}: {item[:40]!r} is not an absolute path; ignored")
            continue
        out.append(item)
    if not out:
        found.problems.append(f"{spec.name}: no usable path; using {spec.default}")
        return DEFAULTS[spec.name]
    return tuple(out)


def _origins(spec: Setting, raw: str | None, found: Findings) -> tuple[str, ...]:
    """("*",) allows any origin."""
    origins = tuple(o.strip().rstrip("/") for o in (raw or "").split(",") if o.strip())
    return origins or DEFAULTS[spec.name]


def _number(spec: Setting, raw: str | None, found: Findings) -> float:
    """A number within the setting's bounds; its default (and a problem) otherwise."""
    lo, hi = float(spec.lo), float(spec.hi)  # type: ignore[arg-type]
    if _blank(raw):
        return float(DEFAULTS[spec.name])
    try:
        value = float(str(raw).strip())
    except ValueError:
        default = float(DEFAULTS[spec.name])
        found.problems.append(f"{spec.name}: {raw!r} is not a number; using {default:g}")
        return default
    if not math.isfinite(value) or not lo <= value <= hi:
        default = float(DEFAULTS[spec.name])
        outside = f"{value:g} is outside {lo:g}..{hi:g}"
        found.problems.append(f"{spec.name}: {outside}; using {default:g}")
        return default
    return value


def _integer(spec: Setting, raw: str | None, found: Findings) -> int:
    return int(_number(spec, raw, found))


def _seconds_by_role(spec: Setting, raw: str | None, found: Findings) -> dict[str, float]:
    if _blank(raw):
        return dict(DEFAULTS[spec.name])
    try:
        data = json.loads(str(raw))
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        found.problems.append(f"{spec.name}: not valid JSON; using defaults")
        return dict(DEFAULTS[spec.name])
    if not isinstance(data, dict):
        found.problems.append(f"{spec.name}: expected an object such as {spec.default}")
        return dict(DEFAULTS[spec.name])
    out: dict[str, float] = {}
    for role, value in data.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not spec.lo <= value <= spec.hi:  # type: ignore[operator]
            span = f"{_text(spec.lo)}..{_text(spec.hi)}"
            found.problems.append(f"{spec.name}.{role}: expected seconds {span}; ignored")
            continue
        out[str(role)] = float(value)
    return out


def _path(spec: Setting, raw: str | None, found: Findings) -> str:
    path, problem = parse_path(spec.name, raw, str(spec.default))
    if problem:
        found.problems.append(problem)
    return path


def _path_or_empty(spec: Setting, raw: str | None, found: Findings) -> str | None:
    path, problem = parse_optional_path(spec.name, raw, str(spec.default))
    if problem:
        found.problems.append(problem)
    return path


def _node_numbers(spec: Setting, raw: str | None, found: Findings) -> tuple[int, ...]:
    out: list[int] = []
    for item in (p.strip() for p in (raw or "").split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) not in NODE_NUMBERS:
            found.problems.append(f"{spec.name}: {item[:20]!r} is not a node number; ignored")
            continue
        if int(item) not in out:
            out.append(int(item))
    return tuple(out)


def _choice(spec: Setting, raw: str | None, found: Findings) -> str:
    value = (raw or "").strip().lower()
    if not value:
        return str(spec.default)
    if value not in spec.choices:
        allowed = " or ".join(spec.choices)
        found.problems.append(f"{spec.name}: {raw[:40]!r} is not {allowed}; using {spec.default}")
        return str(spec.default)
    return value


PARSERS: dict[Kind, Parser] = {
    "endpoint": _endpoint,
    "keys": _keys,
    "token": _token,
    "flag": _flag,
    "routes": _routes,
    "paths": _paths,
    "origins": _origins,
    "number": _number,
    "integer": _integer,
    "seconds by role": _seconds_by_role,
    "path": _path,
    "path or empty": _path_or_empty,
    "node numbers": _node_numbers,
    "choice": _choice,
}


def _declared_defaults() -> dict[str, Any]:
    """Each setting's value when unset: its declared default, read by its own parser. A
    declared default that does not read cleanly stops the import here."""
    values = {}
    for s in SETTINGS:
        found = Findings()
        try:
            values[s.name] = s.read(s.default, found)
        except KeyError:  # its parser needed the very default it is reading
            found.problems.append(s.name)
        if found.problems or found.fatal:
            raise ValueError(f"settings: {s.name}'s declared default {s.default!r} is invalid")
    return values


DEFAULTS: dict[str, Any] = {}  # filled once every default has read cleanly
DEFAULTS.update(_declared_defaults())


# ---- the generated files ------------------------------------------------------------------------


def wrangler_vars() -> dict[str, str]:
    """The [vars] block wrangler.toml must carry."""
    return {s.name: _text(s.default) for s in SETTINGS if s.in_wrangler}


def docs_table() -> str:
    """The Markdown table of docs/configuration.md."""
    rows = ["| name | kind | default | range | what it does |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        rng = f"{_text(s.lo)}..{_text(s.hi)}" if s.lo is not None else " \\| ".join(s.choices)
        default = f"`{_text(s.default)}`" if s.default is not None else ""
        kind = "secret" if s.secret else s.kind
        rows.append(f"| `{s.name}` | {kind} | {default} | {rng} | {s.doc} |")
    return "\n".join(rows) + "\n"


def _text(value: float | str | None) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)
