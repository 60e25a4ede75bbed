"""`make dev`: a simulated 8-node cluster on loopback plus the gateway in front of it.

    python -m harness.dev [--port 8787] [--no-train]

The fleet runs in its own process (`python -m sim.fleet`); the gateway runs in the offline
Workers runtime with COLAB_ENDPOINT_1..8 pointing at the fleet. Nodes 7-8 (the batch pair) run
the real batch worker (`heady_node.batch_worker`, owned by the fleet process) against their
simulated engines, with the capacity model `sim.fleet.BATCH_CAPACITY`, so the Files + Batch API
works offline.

Fine-tuning works offline too: the text nodes (reasoning, code, batch) serve LoRA adapters with
vLLM's semantics and heady_node's real resolver fetching them from this gateway
(`sim.fleet.Fleet.serve_lora`), and nodes 7-8 run the real fine-tuning runner in the torch venv
(`.venv-torch`, Python 3.11: `make torch-install`), which trains a TINY RANDOM STAND-IN on the
CPU under the served base's name (`heady_node.finetune.devbase`: the simulated cluster's trainer,
never a real node's), taking its node's engine down for the job and back up after. Without that
venv (or with `--no-train` / HEADY_DEV_TRAIN=0) fine-tuning jobs never start (they wait in
`validating_files`). Everything stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bindings import fleet_env
from harness.gateway import ROOT, Gateway, build_config, parse_dev_vars, serve_until_signal
from sim.fleet import BATCH_CAPACITY, BATCH_NODES, FleetProcess

DEV_KEY = "dev-key"
WORKER_LOGS = ROOT / ".harness" / "dev-workers"  # worker-<n>.log, trainer-<n>.log, lora-cache/
TORCH_VENV = ROOT / ".venv-torch"
TRAIN_ENV = "HEADY_DEV_TRAIN"  # 0: no trainers (the Makefile's TRAIN=0)


def torch_python(venv: Path = TORCH_VENV) -> tuple[Path | None, str]:
    """The torch venv's interpreter if `make torch-install` completed there (its marker is
    written last), else None and why."""
    python = venv / "bin" / "python"
    if not python.exists():
        return (
            None,
            f"no torch venv at {venv.relative_to(ROOT) if venv.is_relative_to(ROOT) else venv}",
        )
    if not any(venv.glob(".installed-*")):
        return None, f"the torch venv at {venv} is incomplete (its install did not finish)"
    return python, ""


@dataclass
class DevCluster:
    """What `make dev` runs: the fleet (workers, LoRA serving, trainers) and the gateway."""

    fleet: FleetProcess
    gw: Gateway
    cfg: dict[str, Any]
    node_secret: str
    log_dir: Path
    trainers: dict[str, Any] = field(default_factory=dict)  # empty: fine-tuning stays queued
    no_train_reason: str = ""

    def stop(self) -> None:
        try:
            self.gw.stop()
        finally:
            self.fleet.stop()


def start(
    port: int = 0,
    *,
    train: bool = True,
    venv: Path = TORCH_VENV,
    log_dir: Path = WORKER_LOGS,
    dev_vars: Path | None = ROOT / ".dev.vars",
    settings: Mapping[str, str] | None = None,
    trainer_times: Mapping[str, float] | None = None,
    fleet_python: Path | None = None,
) -> DevCluster:
    """Start the simulated cluster and the gateway as `make dev` does (port 0: a free one).
    `settings`: gateway vars over .dev.vars' and the defaults; `trainer_times`: the trainers'
    drain_s / poll_s / poll_max_s (sim.fleet.TrainerSpec); `fleet_python`: the fleet's
    interpreter (default this one: make dev runs in the project's 3.12 venv)."""
    node_token = secrets.token_hex(16)
    node_secret = secrets.token_hex(32)  # NODE_SECRET: the nodes' credentials derive from it
    fleet = FleetProcess(api_key=node_token, capacity=BATCH_CAPACITY, python=fleet_python)
    fleet.start()
    gw: Gateway | None = None
    try:
        # Local settings from .dev.vars (timeouts, CORS, ROUTES...) apply, but the endpoints,
        # token and key are the simulated cluster's.
        bindings = parse_dev_vars(dev_vars.read_text()) if dev_vars and dev_vars.exists() else {}
        bindings.update(
            fleet_env(fleet, node_token=node_token, api_keys=DEV_KEY, node_secret=node_secret)
        )
        bindings.setdefault("ATTEMPT_TIMEOUT_S", "10")
        bindings.update(settings or {})
        cfg = build_config(bindings=bindings, port=port)
        gw = Gateway(cfg)
        gw.start()
        fleet.start_workers(gw.url, node_secret, BATCH_NODES, log_dir=log_dir)
        fleet.serve_lora(gw.url, node_secret, cache_dir=log_dir / "lora-cache")
        cluster = DevCluster(fleet, gw, cfg, node_secret, log_dir)
        python, why = torch_python(venv) if train else (None, f"{TRAIN_ENV}=0 / --no-train")
        if python is not None:
            cluster.trainers = fleet.start_trainers(
                gw.url, node_secret, python, BATCH_NODES, log_dir=log_dir, **(trainer_times or {})
            )
        else:
            cluster.no_train_reason = why
        # One health round now, so the gateway knows at once which nodes serve LoRA on which
        # base (the local cron's first tick comes only after its period).
        gw.scheduled(cfg["crons"][0] if cfg["crons"] else "*/5 * * * *")
        return cluster
    except BaseException:
        if gw is not None:
            gw.stop()
        fleet.stop()
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8787")))
    ap.add_argument(
        "--cron-every",
        type=float,
        default=60.0,
        help="seconds between local cron ticks (health probes)",
    )
    ap.add_argument(
        "--no-train",
        action="store_true",
        default=os.environ.get(TRAIN_ENV, "1").strip() == "0",
        help=f"no fine-tuning trainers beside nodes 7-8 (default from ${TRAIN_ENV}=0)",
    )
    args = ap.parse_args(argv)

    cluster = start(args.port, train=not args.no_train)
    url, control, logs = cluster.gw.url, cluster.fleet.control_url, WORKER_LOGS.relative_to(ROOT)
    if cluster.trainers:
        training = (
            "  trainers: the fine-tuning runner beside nodes 7-8 (.venv-torch), training a tiny\n"
            "            random stand-in on the CPU under the served base's name (trainer-<n>.log)"
        )
    else:
        training = (
            f"  trainers: NONE ({cluster.no_train_reason}): fine-tuning jobs will not start.\n"
            "            Fix: `make torch-install` (or `make dev` without TRAIN=0), then restart."
        )
    print(
        f"""
Heady gateway (offline Workers runtime) in front of a simulated 8-node cluster.
  gateway : {url}      API key: {DEV_KEY}
  status  : {url}/      (open in a browser; enter the API key once)
  fleet   : control API {control}  (nodes 1-8 on loopback; batch workers
            beside nodes 7-8, logs in {logs}/)
{training}

Try it:
  curl -s {url}/api/heavy/reasoning/v1/chat/completions -H 'authorization: Bearer {DEV_KEY}' \\
       -H 'content-type: application/json' \\
       -d '{{"model":"reasoning","messages":[{{"role":"user","content":"hi"}}]}}'
  curl -s {url}/api/status -H 'authorization: Bearer {DEV_KEY}'
Break a node and watch the failover (x-heady-node / x-heady-attempts headers):
  curl -s -X POST {control}/nodes/1 -d '{{"mode":"refuse"}}'
  curl -s -X POST {control}/reset
Batch API (openai SDK, base_url {url}/api/heavy/batch/v1): see docs/batch.md "Try it offline".
Fine-tuning (openai SDK): paste the README's "Fine-tuning" snippet (GW = {url}):
  Qwen/Qwen2.5-7B-Instruct-AWQ trains on node 8 and is then served by nodes 1 and 8;
  Qwen/Qwen2.5-3B-Instruct trains on node 7 and is served there. A node is down while it
  trains (curl -s {control}/trainers); docs/fine-tuning.md "The dev cluster".
Kill a batch node with its worker (and trainer) mid-batch, then bring them back:
  curl -s -X POST {control}/nodes/7/kill
  curl -s -X POST {control}/nodes/7/revive
""",
        flush=True,
    )

    return serve_until_signal(
        cluster.gw, cluster.cfg, args.cron_every, cleanup=(cluster.fleet.stop,)
    )


if __name__ == "__main__":
    sys.exit(main())
