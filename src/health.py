"""Node health: per-node HealthState, its transitions, and the KV record that shares it.

Pure. The shell keeps one HealthView per isolate, feeds it attempt outcomes and probe
results, and persists the view to Workers KV only when a transition happened
(`HealthView.apply` marks the view dirty; `HealthView.may_write` says when to write). The
whole fleet lives in ONE KV key, so an isolate refreshes its view with a single read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Literal

from config import HealthPolicy
from heady_shared import capabilities as caps
from heady_shared.metrics import MAX_LOAD
from heady_shared.routes import NODE_NUMBERS
from settings import BY_NAME

State = Literal["up", "down", "unknown"]
KV_KEY = "health:v1"
RECORD_VERSION = 1
LOAD_TTL_S = 900.0  # a load older than this no longer steers balancing
FORGET_AFTER_S = 86400.0  # a record older than this says nothing any more
MIN_KV_TTL_S = 60  # KV rejects expirationTtl below 60 s
# Bounds for every number in the shared KV record: anything another isolate (or a corrupt or
# hostile write) put there is clamped into these before it is trusted or written back. Each
# stays far below 2**53, so it crosses into JS as a Number, never a BigInt. A load is bounded
# by heady_shared.metrics.MAX_LOAD, the bound its probe reading already passed.
MAX_COOLDOWN_S = float(BY_NAME["COOLDOWN_MAX_S"].hi or 0)  # the largest settable cooldown
MAX_FAILURES = 64  # cooldown_s stops growing long before this
MAX_LATENCY_MS = 3_600_000.0
MAX_CLOCK_SKEW_S = 5.0  # a write stamped further ahead than this is not believed


@dataclass(frozen=True, slots=True)
class HealthState:
    """What is known about one node. Times are epoch seconds."""

    state: State = "unknown"
    since: float | None = None  # when the current state began
    until: float | None = None  # end of the cooldown while down
    failures: int = 0  # consecutive failures (survive a short recovery)
    reason: str | None = None  # last failure reason
    at: float = 0.0  # when this record was last changed by an observation (merge order)
    latency_ms: float | None = None
    load: int | None = None
    load_at: float | None = None
    model: str | None = None  # the node's served model id, from its metrics (cron)
    checked_at: float | None = None  # last active probe
    # What the node reports it serves (heady_shared.capabilities, from its metrics via the
    # cron); None: not known yet (never probed, or a node that does not report them).
    capabilities: tuple[str, ...] | None = None


def cooldown_s(failures: int, policy: HealthPolicy) -> float:
    """Exponential back-off: base, 2x base, 4x base ... capped."""
    exponent = max(0, min(failures - 1, 30))
    return min(policy.cooldown_base_s * (2**exponent), policy.cooldown_max_s)


def on_failure(
    h: HealthState,
    now: float,
    reason: str,
    policy: HealthPolicy,
    retry_after_s: float | None = None,
) -> HealthState:
    """A node failed an attempt or a probe: mark it down with a growing cooldown.

    A node that was down-and-cooling already is left as it is (one failure per cooldown
    counts), so concurrent requests hitting the same dead node do not inflate the back-off.
    """
    if h.state == "down" and h.until is not None and h.until > now:
        if retry_after_s is not None:
            until = now + min(retry_after_s, policy.cooldown_max_s)
            if until > h.until:
                return replace(h, until=until, at=now)
        return h
    recently_recovered = (
        h.state == "up" and h.since is not None and now - h.since < policy.stable_after_s
    )
    failures = h.failures + 1 if (h.state == "down" or recently_recovered) else 1
    cool = cooldown_s(failures, policy)
    if retry_after_s is not None:
        cool = min(max(retry_after_s, 1.0), policy.cooldown_max_s)
    since = h.since if h.state == "down" and h.since is not None else now
    return replace(
        h, state="down", since=since, until=now + cool, failures=failures, reason=reason, at=now
    )


def on_success(h: HealthState, now: float, latency_ms: float | None = None) -> HealthState:
    """A node answered. Clears a down mark; on a node already up only latency changes."""
    if h.state == "up":
        return h if latency_ms is None else replace(h, latency_ms=latency_ms)
    return replace(
        h,
        state="up",
        since=now,
        until=None,
        reason=None,
        at=now,
        latency_ms=latency_ms if latency_ms is not None else h.latency_ms,
        # failures are kept: on_failure restarts the count once the node has been stable
    )


def with_probe(
    h: HealthState,
    now: float,
    load: int | None,
    latency_ms: float | None,
    model: str | None = None,
    capabilities: tuple[str, ...] | None = None,
) -> HealthState:
    return replace(
        h,
        at=now,
        checked_at=now,
        latency_ms=latency_ms if latency_ms is not None else h.latency_ms,
        load=load if load is not None else h.load,
        load_at=now if load is not None else h.load_at,
        model=model if model is not None else h.model,
        capabilities=capabilities if capabilities is not None else h.capabilities,
    )


def is_transition(old: HealthState, new: HealthState) -> bool:
    """Worth telling other isolates: up<->down, a new cooldown, or a moved cooldown end.
    A first success on a node nobody had marked (unknown -> up) is not news: an unknown
    node is tried anyway."""
    if old.state == "unknown" and new.state == "up":
        return False
    return old.state != new.state or (new.state == "down" and old.until != new.until)


def covers(theirs: HealthState | None, mine: HealthState, policy: HealthPolicy) -> bool:
    """Does KV's record for a node (`theirs`) already say what this isolate knows (`mine`)?
    Then writing ours would be a wasted write. A down mark counts as known when KV holds
    one ending at most half a base cooldown earlier: another isolate saw the same outage."""
    if mine.at == 0.0:
        return True  # nothing observed here beyond what was read
    if theirs is None:
        return mine.state == "unknown"
    if theirs.state != mine.state:
        return False
    if mine.load is not None and mine.load != theirs.load:
        return False
    if mine.capabilities is not None and mine.capabilities != theirs.capabilities:
        return False
    if mine.state != "down":
        return True
    slack = policy.cooldown_base_s / 2
    return (theirs.until or 0.0) >= (mine.until or 0.0) - slack


class HealthView:
    """One isolate's knowledge of every node, merged with KV now and then."""

    def __init__(self) -> None:
        self.nodes: dict[int, HealthState] = {}
        self.loaded_at: float | None = None  # last KV read
        self.written_at: float = 0.0  # last KV write by anyone, as far as we know
        self.dirty = False  # a transition not yet written to KV
        self.changes = 0  # transitions so far: a write covers only those made before it

    def get(self, n: int) -> HealthState:
        return self.nodes.get(n) or HealthState()

    def is_down(self, n: int, now: float) -> bool:
        h = self.nodes.get(n)
        return h is not None and h.state == "down" and h.until is not None and h.until > now

    def effective_state(self, n: int, now: float) -> State:
        h = self.get(n)
        if h.state == "down" and not self.is_down(n, now):
            return "unknown"  # cooldown over: on probation until the next observation
        return h.state

    def load(self, n: int, now: float) -> int | None:
        h = self.nodes.get(n)
        if h is None or h.load is None or h.load_at is None or now - h.load_at > LOAD_TTL_S:
            return None
        return h.load

    def capabilities(self, n: int) -> tuple[str, ...] | None:
        """What node n reported it serves; None while unknown."""
        h = self.nodes.get(n)
        return None if h is None else h.capabilities

    def apply(self, n: int, new: HealthState) -> bool:
        """Store a node's new state; returns True when it is a transition worth sharing."""
        old = self.get(n)
        self.nodes[n] = new
        changed = is_transition(old, new)
        if changed:
            self.dirty = True
            self.changes += 1
        return changed

    def needs_refresh(self, now: float, policy: HealthPolicy) -> bool:
        return self.loaded_at is None or now - self.loaded_at >= policy.refresh_s

    def may_write(self, now: float, policy: HealthPolicy) -> bool:
        """KV economy: a pending transition is written once the interval since the last
        write (ours or, as far as we have read, anyone's) has passed."""
        return self.dirty and now - self.written_at >= policy.min_write_interval_s

    def merge(self, records: dict[int, HealthState], written_at: float, now: float) -> None:
        """Fold a KV snapshot in: per node, the newer observation wins."""
        for n, theirs in records.items():
            mine = self.nodes.get(n)
            if mine is None or theirs.at > mine.at:
                self.nodes[n] = theirs
        self.written_at = max(self.written_at, written_at)
        self.loaded_at = now


def encode(view: HealthView, now: float) -> tuple[str, int]:
    """The KV value for the whole fleet and its expirationTtl.

    Each node record carries its own `until`; the key expires after the longest remaining
    cooldown plus a day, so a forgotten mark heals itself even if nobody writes again. Every
    number is passed through the same bounds as `decode`, so what is written is finite JSON
    that reads back unchanged (strict JSON: no NaN/Infinity) and the TTL is a small int.
    """
    nodes = {}
    for n, h in sorted(view.nodes.items()):
        if h.at == 0.0 and h.checked_at is None:
            continue
        h = bounded(h, now)  # the same bounds decode applies: what is written reads back as is
        nodes[str(n)] = {
            "s": h.state,
            "since": h.since,
            "until": h.until,
            "f": h.failures,
            "r": h.reason,
            "at": h.at,
            "lat": h.latency_ms,
            "load": h.load,
            "load_at": h.load_at,
            "chk": h.checked_at,
            "m": h.model,
        }
        if h.capabilities is not None:
            nodes[str(n)]["c"] = list(h.capabilities)
    body = json.dumps(
        {"v": RECORD_VERSION, "written_at": now, "nodes": nodes},
        separators=(",", ":"),
        allow_nan=False,
    )
    longest = max((h.until - now for h in view.nodes.values() if h.until), default=0.0)
    longest = min(longest, MAX_COOLDOWN_S) if math.isfinite(longest) else MAX_COOLDOWN_S
    ttl = max(MIN_KV_TTL_S, math.ceil(longest + FORGET_AFTER_S))
    return body, ttl


def bounded(h: HealthState, latest: float) -> HealthState:
    """The record with every number clamped into range.

    `at` (when it was observed) is never after `latest`; the other times never after `at`
    (every transition stamps them no later than `at`), and a cooldown ends at most
    MAX_COOLDOWN_S after it; counts and measurements stay within their bounds. An
    out-of-range optional value says nothing (None) rather than something absurd.
    """
    at = min(h.at, latest) if math.isfinite(h.at) and h.at > 0 else 0.0
    return replace(
        h,
        since=_time(h.since, at),
        until=_time(h.until, at + MAX_COOLDOWN_S),
        failures=min(max(h.failures, 0), MAX_FAILURES),
        reason=h.reason[:64] if h.reason else None,
        at=at,
        latency_ms=_in_range(h.latency_ms, 0.0, MAX_LATENCY_MS),
        load=h.load if h.load is not None and 0 <= h.load <= MAX_LOAD else None,
        load_at=_time(h.load_at, at),
        checked_at=_time(h.checked_at, at),
        capabilities=_capabilities(h.capabilities),
    )


def decode(raw: str | None, now: float) -> tuple[dict[int, HealthState], float]:
    """Parse a KV value; anything unreadable or stale is ignored rather than trusted.

    Never raises, and every number it returns is within the bounds `encode` writes. Time
    stamps from the future are not believed: a record is taken as observed no later than the
    write that stored it (`written_at`, itself at most `now`), so a stamp far ahead can never
    outrank what this isolate observes after reading it. A write stamped more than
    MAX_CLOCK_SKEW_S ahead vouches for nothing: its future records are dropped.
    """
    if not raw:
        return {}, 0.0
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return {}, 0.0
    if not isinstance(data, dict) or data.get("v") != RECORD_VERSION:
        return {}, 0.0
    nodes = data.get("nodes")
    if not isinstance(nodes, dict):
        return {}, 0.0
    written = _time(_opt_float(data.get("written_at")), math.inf)
    if written is not None and written > now + MAX_CLOCK_SKEW_S:
        written = None
    latest = now if written is None else min(written, now)
    out: dict[int, HealthState] = {}
    for key, rec in nodes.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and key[0] != "0"):
            continue
        n = int(key)
        try:
            h = HealthState(
                state=rec["s"] if rec["s"] in ("up", "down", "unknown") else "unknown",
                since=_opt_float(rec.get("since")),
                until=_opt_float(rec.get("until")),
                failures=int(rec.get("f") or 0),
                reason=str(rec["r"])[:64] if rec.get("r") else None,
                at=float(rec.get("at") or 0.0),
                latency_ms=_opt_float(rec.get("lat")),
                load=int(rec["load"]) if rec.get("load") is not None else None,
                load_at=_opt_float(rec.get("load_at")),
                checked_at=_opt_float(rec.get("chk")),
                model=_model(rec.get("m")),
                capabilities=_capabilities(rec.get("c")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            continue
        if n not in NODE_NUMBERS or not math.isfinite(h.at) or h.at <= 0:
            continue
        if written is None and h.at > now:
            continue  # from the future, and no sane write time to pin it to
        h = bounded(h, latest)
        if now - h.at < FORGET_AFTER_S:
            out[n] = h
    return out, (0.0 if written is None else latest)


def _model(value: object) -> str | None:
    """A model id as the cron stores it: 1..128 printable ASCII characters, else nothing."""
    ok = isinstance(value, str) and 0 < len(value) <= 128
    return value if ok and all(0x20 < ord(c) < 0x7F for c in value) else None  # type: ignore[union-attr]


def _capabilities(value: object) -> tuple[str, ...] | None:
    """Known capability names only, each once, in heady_shared's order; anything that is not
    a short list says nothing (None). Bounded: at most len(KNOWN) names ever come back."""
    if not isinstance(value, list | tuple) or len(value) > 16:
        return None
    have = {v for v in value if isinstance(v, str)}
    return tuple(c for c in caps.KNOWN if c in have)


def _opt_float(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _in_range(value: float | None, lo: float, hi: float) -> float | None:
    """A finite value inside [lo, hi] as it is; anything else says nothing (None)."""
    if value is None or not math.isfinite(value) or not lo <= value <= hi:
        return None
    return float(value)


def _time(value: float | None, latest: float) -> float | None:
    """An epoch time: None unless finite and positive; never later than `latest`."""
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return float(min(value, latest))
