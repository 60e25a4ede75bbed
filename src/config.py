"""Gateway configuration: Worker vars and secrets (plain strings) -> a validated GatewayConfig.

Pure: no `js` import. Every problem is reported as a readable message; a bad value never
raises out of `load_config`. Node URLs and tokens are secrets, so no message quotes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune import FtSettings
from heady_shared.endpoints import EndpointState
from heady_shared.routes import Pool
from jobdb import BatchSettings
from settings import DEFAULTS, SETTINGS, Findings


@dataclass(frozen=True, slots=True)
class Node:
    """One GPU node slot. `base_url` is a secret: never log or return it."""

    number: int
    config: EndpointState
    base_url: str | None = None
    reason: str | None = None

    @property
    def usable(self) -> bool:
        return self.config == "configured"


# Every default below is the declared one (settings.DEFAULTS): one source, and a setting left
# unset gives the same value as the dataclass built without it (tests/unit/test_settings.py).


@dataclass(frozen=True, slots=True)
class Timeouts:
    attempt_s: float = DEFAULTS["ATTEMPT_TIMEOUT_S"]  # per attempt: until the response head
    deadline_s: float = DEFAULTS["DEADLINE_S"]  # whole request, all attempts together
    per_role_attempt_s: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULTS["ROLE_TIMEOUTS_S"])
    )
    # the client's whole upload; the node's clock starts after it
    upload_s: float = DEFAULTS["UPLOAD_TIMEOUT_S"]
    # a streamed answer's longest silence after its head (0: none)
    stream_idle_s: float = DEFAULTS["STREAM_IDLE_S"]

    def attempt_for(self, role: str) -> float:
        return self.per_role_attempt_s.get(role, self.attempt_s)


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    cooldown_base_s: float = DEFAULTS["COOLDOWN_BASE_S"]
    cooldown_max_s: float = DEFAULTS["COOLDOWN_MAX_S"]
    # Failures keep counting across a recovery shorter than this, so a flapping node's
    # cooldown keeps growing instead of restarting at the base every cycle.
    stable_after_s: float = DEFAULTS["STABLE_AFTER_S"]
    refresh_s: float = DEFAULTS["HEALTH_REFRESH_S"]  # isolate memory -> KV re-read
    min_write_interval_s: float = DEFAULTS["KV_MIN_WRITE_INTERVAL_S"]  # KV economy: docs/budgets.md
    probe_path: str = DEFAULTS["HEALTH_PATH"]
    metrics_path: str | None = DEFAULTS["METRICS_PATH"]
    probe_timeout_s: float = DEFAULTS["PROBE_TIMEOUT_S"]
    probe_up_every_s: float = DEFAULTS["PROBE_UP_EVERY_S"]  # healthy nodes are probed this sparsely
    kv_timeout_s: float = DEFAULTS["KV_TIMEOUT_S"]  # KV is a hint: a slower call is given up


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    nodes: tuple[Node, ...]
    pools: Mapping[str, Pool]
    api_keys: tuple[str, ...]
    auth_disabled: bool
    node_token: str | None
    node_secret: str | None  # NODE_SECRET: node credentials derive from it (nodeauth)
    timeouts: Timeouts
    health: HealthPolicy
    max_body_bytes: int
    max_attempts: int
    cors_origins: tuple[str, ...]  # ("*",) allows any origin
    upstream_paths: tuple[str, ...]  # forwarded path prefixes ("/v1/") or exact paths
    stream_relay: str  # "native" | "guarded" (jsio.Relay)
    problems: tuple[str, ...]  # non-fatal: reported in /api/status
    fatal: tuple[str, ...]  # the gateway cannot route at all: heavy routes answer 503
    batch: BatchSettings = field(default_factory=BatchSettings)  # Files + Batch API (docs/batch.md)
    # Fine-tuning jobs (docs/fine-tuning-jobs.md): who may train (empty: the batch pair)
    finetune: FtSettings = field(default_factory=FtSettings)
    train_nodes: tuple[int, ...] = DEFAULTS["TRAIN_NODES"]

    def node(self, number: int) -> Node:
        return self.nodes[number - 1]

    def may_train(self, node: int) -> bool:
        """Whether `node` may lease fine-tuning jobs: TRAIN_NODES, or unset the batch pair."""
        if self.train_nodes:
            return node in self.train_nodes
        pool = self.pools.get("batch")
        return pool is not None and node in pool.pair

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.pools)


def load_config(env: Mapping[str, str | None]) -> GatewayConfig:
    """Build the configuration from the Worker's vars and secrets, never raising: each setting
    is read by its own parser into the field its row names (src/settings.py)."""
    found = Findings()
    parts: dict[str, dict[str, Any]] = {
        "": {},
        "nodes": {},
        "timeouts": {},
        "health": {},
        "batch": {},
        "finetune": {},
    }
    for spec in SETTINGS:
        part, _, name = spec.into.rpartition(".")
        parts[part][name] = spec.read(env.get(spec.name), found)

    health = parts["health"]
    if health["cooldown_max_s"] < health["cooldown_base_s"]:
        found.problems.append("COOLDOWN_MAX_S is below COOLDOWN_BASE_S; using the base for both")
        health["cooldown_max_s"] = health["cooldown_base_s"]
    batch = parts["batch"]
    if batch["heartbeat_s"] >= batch["lease_s"]:
        found.problems.append(
            "BATCH_HEARTBEAT_S is not below BATCH_LEASE_S; heartbeating at a third of the lease"
        )
        batch["heartbeat_s"] = batch["lease_s"] / 3
    ft = parts["finetune"]
    if ft["heartbeat_s"] >= ft["lease_s"]:
        found.problems.append(
            "FT_HEARTBEAT_S is not below FT_LEASE_S; heartbeating at a third of the lease"
        )
        ft["heartbeat_s"] = ft["lease_s"] / 3
    nodes = tuple(
        Node(int(n), ep.state, ep.base_url, ep.reason) for n, ep in parts["nodes"].items()
    )
    return GatewayConfig(
        **parts[""],
        nodes=nodes,
        timeouts=Timeouts(**parts["timeouts"]),
        health=HealthPolicy(**health),
        batch=BatchSettings(**batch),
        finetune=FtSettings(**ft),
        problems=tuple(found.problems),
        fatal=tuple(found.fatal),
    )
