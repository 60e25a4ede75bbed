"""`make dev`: a simulated 8-node cluster on loopback plus the gateway in front of it.

    python -m harness.dev [--port 8787]

The fleet runs in its own process (`python -m sim.fleet`); the gateway runs in the offline
Workers runtime with COLAB_ENDPOINT_1..8 pointing at the fleet. Nodes 7-8 (the batch pair) run
the real batch worker (`heady_node.batch_worker`, owned by the fleet process) against their
simulated engines, with the capacity model `sim.fleet.BATCH_CAPACITY`, so the Files + Batch API
works offline. Everything stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from harness.bindings import fleet_env
from harness.gateway import ROOT, Gateway, build_config, parse_dev_vars, serve_until_signal
from sim.fleet import BATCH_CAPACITY, BATCH_NODES, FleetProcess

DEV_KEY = "dev-key"
WORKER_LOGS = ROOT / ".harness" / "dev-workers"  # worker-<n>.log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8787")))
    ap.add_argument(
        "--cron-every",
        type=float,
        default=60.0,
        help="seconds between local cron ticks (health probes)",
    )
    args = ap.parse_args(argv)

    node_token = secrets.token_hex(16)
    node_secret = secrets.token_hex(32)  # NODE_SECRET: the workers' credentials derive from it
    fleet = FleetProcess(api_key=node_token, capacity=BATCH_CAPACITY).start()
    # Local settings from .dev.vars (timeouts, CORS, ROUTES...) apply, but the endpoints,
    # token and key are the simulated cluster's.
    dev_vars = ROOT / ".dev.vars"
    bindings = parse_dev_vars(dev_vars.read_text()) if dev_vars.exists() else {}
    bindings.update(
        fleet_env(fleet, node_token=node_token, api_keys=DEV_KEY, node_secret=node_secret)
    )
    bindings.setdefault("ATTEMPT_TIMEOUT_S", "10")
    cfg = build_config(bindings=bindings, port=args.port)
    gw = Gateway(cfg)
    try:
        gw.start()
        fleet.start_workers(gw.url, node_secret, BATCH_NODES, log_dir=WORKER_LOGS)
    except BaseException:
        gw.stop()
        fleet.stop()
        raise

    url = gw.url
    control = fleet.control_url
    print(
        f"""
Heady gateway (offline Workers runtime) in front of a simulated 8-node cluster.
  gateway : {url}      API key: {DEV_KEY}
  status  : {url}/      (open in a browser; enter the API key once)
  fleet   : control API {control}  (nodes 1-8 on loopback; batch workers
            beside nodes 7-8, logs in {WORKER_LOGS.relative_to(ROOT)}/)

Try it:
  curl -s {url}/api/heavy/reasoning/v1/chat/completions -H 'authorization: Bearer {DEV_KEY}' \\
       -H 'content-type: application/json' \\
       -d '{{"model":"reasoning","messages":[{{"role":"user","content":"hi"}}]}}'
  curl -s {url}/api/status -H 'authorization: Bearer {DEV_KEY}'
Break a node and watch the failover (x-heady-node / x-heady-attempts headers):
  curl -s -X POST {control}/nodes/1 -d '{{"mode":"refuse"}}'
  curl -s -X POST {control}/reset
Batch API (openai SDK, base_url {url}/api/heavy/batch/v1): see docs/batch.md "Try it offline".
Kill a batch node with its worker mid-batch, then bring both back:
  curl -s -X POST {control}/nodes/7/kill
  curl -s -X POST {control}/nodes/7/revive
""",
        flush=True,
    )

    return serve_until_signal(gw, cfg, args.cron_every, cleanup=(fleet.stop,))


if __name__ == "__main__":
    sys.exit(main())
