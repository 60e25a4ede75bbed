"""Test double for the ngrok / cloudflared agents (offline tests and dry runs), never a tunnel.

As ngrok: serves the agent's local API (GET /api/tunnels) on `--api-port`, listing `--url` for
`--addr`. As cloudflared: prints the line cloudflared logs once a connection is registered.
Then idles until SIGTERM. `--fail` prints an agent error and exits 1.
"""

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _api_server(port: int, url: str, addr: str) -> ThreadingHTTPServer:
    body = json.dumps(
        {
            "tunnels": [
                {
                    "name": "command_line",
                    "public_url": url,
                    "proto": "https",
                    "config": {"addr": addr, "inspect": True},
                }
            ],
            "uri": "/api/tunnels",
        }
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/api/tunnels"
            self.send_response(200 if ok else 404)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body if ok else b"{}")

        def log_message(self, *args: object) -> None:  # keep the agent log quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heady_node.dry_run_tunnel")
    parser.add_argument("--kind", choices=["ngrok", "cloudflare"], default="ngrok")
    parser.add_argument("--url", default="https://heady-dry-run.ngrok-free.dev")
    parser.add_argument("--addr", default="http://127.0.0.1:8000")
    parser.add_argument("--api-port", type=int, default=4040)
    parser.add_argument("--fail", default=None, help="print this ngrok error code and exit 1")
    args, _ = parser.parse_known_args(argv)
    if args.fail:
        print(f'lvl=eror msg="failed to start tunnel" err="ERR_NGROK_{args.fail}"', flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.kind == "ngrok":
        _api_server(args.api_port, args.url, args.addr)
        print(f'lvl=info msg="dry-run agent API" addr=127.0.0.1:{args.api_port}', flush=True)
    else:
        print("INF Registered tunnel connection connIndex=0 location=dry-run", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
