"""The body of GET /api/status: every node's configuration and health, the route table and
the configuration problems. Pure; no URL or token ever appears in it."""

from __future__ import annotations

import json
import math
import time

import health
from config import GatewayConfig
from finetune import shown_status
from finetune_db import ACTIVE_JOB
from jobdb import Row, num, opt_int
from routing import route_table


def status_body(
    config: GatewayConfig,
    view: health.HealthView,
    now: float,
    request_id: str,
    version: str,
    batches: dict[str, object] | None = None,
    fine_tuning: dict[str, object] | None = None,
) -> dict[str, object]:
    """`batches`: batches.status_view for the calling key; `fine_tuning`: fine_tuning_view
    (None: that storage could not be read)."""
    nodes = []
    for node in config.nodes:
        h = view.get(node.number)
        nodes.append(
            {
                "node": node.number,
                "roles": [p.role for p in config.pools.values() if node.number in p.pair],
                "config": node.config,
                "config_reason": node.reason,
                "state": view.effective_state(node.number, now) if node.usable else "unknown",
                "since": iso(h.since),
                "until": iso(h.until) if view.is_down(node.number, now) else None,
                "reason": h.reason,
                "failures": h.failures,
                "latency_ms": h.latency_ms,
                "load": view.load(node.number, now),
                "model": h.model,
                # What the node reports it serves (null: not known yet); routing keeps
                # requests that need a capability off nodes without it.
                "capabilities": list(h.capabilities) if h.capabilities is not None else None,
                "checked_at": iso(h.checked_at),
            }
        )
    return {
        "gateway": {
            "version": version,
            "request_id": request_id,
            "auth": "disabled" if config.auth_disabled else "on",
            "time": iso(now),
            # How streams are relayed and when a silent one ends (docs/configuration.md).
            "stream_relay": config.stream_relay,
            "stream_idle_s": config.timeouts.stream_idle_s,
        },
        "nodes": nodes,
        "routes": route_table(config.pools),
        "problems": list(config.problems) + list(config.fatal),
        "batches": batches,
        "fine_tuning": fine_tuning,
    }


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# ---- fine-tuning: finetune_db.status_rows shaped for /api/status -----------------------------

ERROR_CHARS = 300  # a failed job's message, as much as a status card shows


def fine_tuning_view(mine: list[Row], summary: Row, now: float) -> dict[str, object]:
    """/api/status's `fine_tuning`: how many jobs of every key are active and which nodes hold
    a live train lease (node numbers only), and the caller's own jobs: active ones, then the
    newest finished ones, each newest first, with who trains it, progress and outcome."""
    jobs = sorted(mine, key=lambda j: str(j["id"]), reverse=True)
    jobs.sort(key=lambda j: num(j["created_at"]), reverse=True)  # stable: ties by id desc
    jobs.sort(key=lambda j: j["status"] not in ACTIVE_JOB)  # active first
    return {
        "active": num(summary.get("active")),
        "nodes": sorted({int(n) for n in str(summary.get("nodes") or "").split(",") if n}),
        "mine": [_ft_job(j, now) for j in jobs],
    }


def _ft_job(j: Row, now: float) -> dict[str, object]:
    live = j.get("work_state") == "leased" and float(j.get("work_expires_at") or 0) >= now  # type: ignore[arg-type]
    error = _json(j.get("error"))
    return {
        "id": j["id"],
        "status": shown_status(j, now),
        "model": j["model"],
        "suffix": j.get("suffix"),
        "fine_tuned_model": j.get("fine_tuned_model"),
        "created_at": num(j["created_at"]),
        "finished_at": opt_int(j.get("finished_at")),
        # The live train lease: which node trains the job and until when it must beat again.
        "holder": {
            "node": opt_int(j.get("work_node")),
            "expires_at": int(float(j["work_expires_at"])),  # type: ignore[arg-type]
            "attempt": num(j.get("work_attempts")),
        }
        if live
        else None,
        "progress": _progress(_json(j.get("last_metrics")), _json(j.get("hyperparameters"))),
        "checkpoints": num(j.get("checkpoints")),
        "trained_tokens": opt_int(j.get("trained_tokens")),
        "error": {
            "code": str(error.get("code") or "error"),
            "message": str(error.get("message") or "")[:ERROR_CHARS],
        }
        if isinstance(error, dict)
        else None,
    }


def _progress(data: object, hp: object) -> dict[str, object] | None:
    """The latest metrics event's step / total steps / losses, and the epoch it falls in (the
    node reports no epoch: every epoch has total_steps / n_epochs steps, hparams.total_steps).
    Only ints and finite numbers pass: the data is a node's, and NaN is not JSON."""
    if not isinstance(data, dict) or not _int(data.get("step")):
        return None
    step, total = data["step"], data.get("total_steps")
    out: dict[str, object] = {"step": step, "total_steps": total if _int(total) else None}
    for k in ("train_loss", "valid_loss", "full_valid_loss"):
        v = data.get(k)
        out[k] = v if _real(v) else None
    epochs = hp.get("n_epochs") if isinstance(hp, dict) else None
    out["n_epochs"] = epochs if _int(epochs) and epochs > 0 else None
    epoch = data.get("epoch")
    if not _int(epoch) and out["n_epochs"] and out["total_steps"]:
        per = out["total_steps"] / epochs  # type: ignore[operator]
        epoch = min(epochs, max(1, math.ceil(step / per))) if per > 0 else None
    out["epoch"] = epoch if _int(epoch) else None
    return out


def _int(v: object) -> bool:
    return type(v) is int and v >= 0


def _real(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)  # type: ignore[arg-type]


def _json(text: object) -> object:
    try:
        return json.loads(str(text)) if text is not None else None
    except ValueError:  # a malformed row must not take the status answer down
        return None
