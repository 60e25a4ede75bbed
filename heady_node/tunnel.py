"""Expose the local engine: ngrok or a named Cloudflare Tunnel (never a quick tunnel).

The plan (argv, env, how to learn the public URL) is pure; `open_tunnel` runs it. Tests and the
notebook's dry run swap the binary for `python -m heady_node.fake_tunnel` via `command=`.
"""

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from heady_node.launcher import log_tail, spawn, stop

QUICK_TUNNEL_WARNING = (
    "Cloudflare quick tunnels (*.trycloudflare.com) do not carry SSE (streamed answers) and cap "
    "200 in-flight requests: use ngrok or a named Cloudflare Tunnel with your own hostname."
)
_NGROK_URL = re.compile(r'msg="?started tunnel"?.*?\burl=(https://[^\s"]+)')
_CF_READY = re.compile(r"Registered tunnel connection")


class TunnelError(RuntimeError):
    pass


@dataclass(frozen=True)
class TunnelPlan:
    kind: str  # "ngrok" | "cloudflare"
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None  # known up front for a named Cloudflare Tunnel


def ngrok_plan(
    port: int, authtoken: str, *, domain: str | None = None, binary: str = "ngrok"
) -> TunnelPlan:
    if not authtoken:
        raise TunnelError(
            "NGROK_AUTHTOKEN is missing: add it in Colab's Secrets panel (key icon) and give "
            "this notebook access (https://dashboard.ngrok.com/get-started/your-authtoken)"
        )
    argv = [binary, "http", f"http://127.0.0.1:{port}", "--log", "stdout", "--log-format", "logfmt"]
    if domain:
        argv += ["--domain", domain]  # a free static domain survives runtime restarts
    # The token goes through the environment so it never shows up in `ps` or in logs.
    return TunnelPlan("ngrok", argv, {"NGROK_AUTHTOKEN": authtoken})


def cloudflare_plan(token: str, hostname: str, *, binary: str = "cloudflared") -> TunnelPlan:
    """A token-run named tunnel takes its ingress from the dashboard: the public hostname's
    service there must be http://localhost:<engine port>."""
    if not token:
        raise TunnelError(
            "CF_TUNNEL_TOKEN is missing: create a named tunnel in Cloudflare Zero Trust > "
            "Networks > Tunnels and store its token as a Colab secret"
        )
    url = public_url(hostname if "://" in hostname else f"https://{hostname}")
    argv = [binary, "tunnel", "--no-autoupdate", "run"]
    return TunnelPlan("cloudflare", argv, {"TUNNEL_TOKEN": token}, url=url)


def public_url(url: str) -> str:
    """Normalise a tunnel URL the gateway will call; refuse what cannot work."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or not host:
        raise TunnelError(f"tunnel URL must be https://HOST, got {url!r}")
    if host.endswith(".trycloudflare.com"):
        raise TunnelError(QUICK_TUNNEL_WARNING)
    return f"https://{parts.netloc}".rstrip("/")


def parse_ngrok_url(line: str) -> str | None:
    m = _NGROK_URL.search(line)
    return m.group(1) if m else None


def scan_log(kind: str, text: str, known_url: str | None) -> str | None:
    """Public URL once the log shows the tunnel is up, else None."""
    if kind == "ngrok":
        for line in text.splitlines():
            if url := parse_ngrok_url(line):
                return public_url(url)
        return None
    return known_url if _CF_READY.search(text) else None


def open_tunnel(
    plan: TunnelPlan,
    *,
    log_path: Path,
    timeout: float = 60.0,
    command: list[str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start the tunnel agent and wait for its public URL; stops it again on failure."""
    proc = spawn(command or plan.argv, log_path=log_path, env=plan.env)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            text = ""
        url = scan_log(plan.kind, text, plan.url)
        if url:
            return proc, url
        if proc.poll() is not None or time.monotonic() >= deadline:
            why = (
                f"exited with code {proc.returncode}"
                if proc.poll() is not None
                else f"gave no URL within {timeout:.0f}s"
            )
            stop(proc, grace=2.0)
            raise TunnelError(f"{plan.kind} {why}; log tail:\n{log_tail(log_path)}")
        time.sleep(0.2)
