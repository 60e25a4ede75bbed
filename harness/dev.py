"""`make dev`: a simulated 8-node cluster on loopback plus the gateway in front of it.

    python -m harness.dev [--port 8787]

The fleet runs in its own process (`python -m sim.fleet`); the gateway runs in the offline
Workers runtime with COLAB_ENDPOINT_1..8 pointing at the fleet. Everything stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys

from harness.gateway import ROOT, Gateway, build_config, parse_dev_vars, serve_until_signal

DEV_KEY = "dev-key"


def start_fleet(node_token: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.fleet", "--api-key", node_token, "--exit-on-stdin-eof"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit("the simulated fleet did not start")
    return proc, json.loads(line)


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
    fleet, info = start_fleet(node_token)
    # Local settings from .dev.vars (timeouts, CORS, ROUTES...) apply, but the endpoints,
    # token and key are the simulated cluster's.
    dev_vars = ROOT / ".dev.vars"
    bindings = parse_dev_vars(dev_vars.read_text()) if dev_vars.exists() else {}
    bindings.update({f"COLAB_ENDPOINT_{n}": url for n, url in info["nodes"].items()})
    bindings.update({"NODE_TOKEN": node_token, "GATEWAY_API_KEYS": DEV_KEY})
    bindings.setdefault("ATTEMPT_TIMEOUT_S", "10")
    cfg = build_config(bindings=bindings, port=args.port)
    gw = Gateway(cfg)
    try:
        gw.start()
    except BaseException:
        fleet.kill()
        raise

    url = gw.url
    control = info["control"]
    print(
        f"""
Heady gateway (offline Workers runtime) in front of a simulated 8-node cluster.
  gateway : {url}      API key: {DEV_KEY}
  fleet   : control API {control}  (nodes 1-8 on loopback)

Try it:
  curl -s {url}/api/heavy/reasoning/v1/chat/completions -H 'authorization: Bearer {DEV_KEY}' \\
       -H 'content-type: application/json' \\
       -d '{{"model":"sim-model","messages":[{{"role":"user","content":"hi"}}]}}'
  curl -s {url}/api/status -H 'authorization: Bearer {DEV_KEY}'
Break a node and watch the failover (x-heady-node / x-heady-attempts headers):
  curl -s -X POST {control}/nodes/1 -d '{{"mode":"refuse"}}'
  curl -s -X POST {control}/reset
""",
        flush=True,
    )

    def stop_fleet() -> None:
        try:
            assert fleet.stdin
            fleet.stdin.close()
            fleet.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            fleet.kill()

    return serve_until_signal(gw, cfg, args.cron_every, cleanup=(stop_fleet,))


if __name__ == "__main__":
    sys.exit(main())
