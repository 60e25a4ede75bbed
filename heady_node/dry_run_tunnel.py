"""Stand-in for the ngrok / cloudflared agents (offline tests and the notebook's dry run).

Prints the line the real agent prints once the tunnel is up, then idles until SIGTERM.
"""

import argparse
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_tunnel")
    parser.add_argument("--kind", choices=["ngrok", "cloudflare"], default="ngrok")
    parser.add_argument("--url", default="https://heady-dry-run.ngrok-free.app")
    parser.add_argument("--fail", action="store_true", help="print an error and exit 1")
    args, _ = parser.parse_known_args(argv)
    if args.fail:
        print('lvl=eror msg="authentication failed: bad authtoken"', flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.kind == "ngrok":
        print(
            'lvl=info msg="started tunnel" obj=tunnels name=command_line '
            f"addr=http://127.0.0.1:8000 url={args.url}",
            flush=True,
        )
    else:
        print("INF Registered tunnel connection connIndex=0 location=dry-run", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
