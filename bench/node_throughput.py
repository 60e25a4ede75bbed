"""Throughput of one simulated node on its own (is the stand-in fast enough to benchmark
through?)::

    python -m bench.node_throughput [--seconds 3] [--clients 2] [--path /health]

Starts ``python -m sim.node`` in a subprocess (so the server has a core to itself), then drives
it from client processes, each with one keep-alive connection sending small requests one at a
time (no pipelining) over raw sockets, so the client side costs as little as possible.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import socket
import subprocess
import sys
import time

_REQUEST = b"GET %b HTTP/1.1\r\nhost: bench\r\n\r\n"


def _client(port: int, path: bytes, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = _REQUEST % path
    done = 0
    deadline = time.monotonic() + seconds
    buf = b""
    while time.monotonic() < deadline:
        for _ in range(100):
            sock.sendall(request)
            while True:  # read one response: head + content-length body
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    m = re.search(rb"content-length: (\d+)", buf[:end], re.IGNORECASE)
                    total = end + 4 + (int(m.group(1)) if m else 0)
                    if len(buf) >= total:
                        buf = buf[total:]
                        break
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buf += chunk
            done += 1
    sock.close()
    out.put(done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.node_throughput", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--path", default="/health", help="e.g. /health, /v1/models, /echo")
    args = parser.parse_args(argv)

    server = subprocess.Popen(
        [sys.executable, "-m", "sim.node", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        match = re.search(r":(\d+) \(Press", line)
        if not match:
            raise SystemExit(f"node did not start: {line!r}")
        port = int(match.group(1))
        out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        procs = [
            mp.Process(target=_client, args=(port, args.path.encode(), args.seconds, out))
            for _ in range(args.clients)
        ]
        for p in procs:
            p.start()
        total = sum(out.get() for _ in procs)
        for p in procs:
            p.join()
    finally:
        server.terminate()
        server.wait(10)
    rate = total / args.seconds
    print(
        f"{args.path}: {total} requests in {args.seconds:.1f}s over {args.clients} keep-alive "
        f"connections = {rate:,.0f} req/s (server: one process, one thread)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
