"""Expose the local engine: a named Cloudflare Tunnel or ngrok (never a quick tunnel).

The plan (argv, env, how to learn the public URL) is pure; `open_tunnel` runs it. Tests and dry
runs swap the agent binary for `python -m heady_node.dry_run_tunnel` via `command=`.

ngrok: `--url https://<domain>` picks the fixed domain ("ngrok http 8080 --url
https://baz.ngrok.dev" in https://ngrok.com/docs/secure-tunnels/ngrok-agent/reference/ngrok/;
`--domain` is the older spelling), and the public URL is read from the agent's local API,
GET http://127.0.0.1:4040/api/tunnels (https://ngrok.com/docs/agent/api/), not from its log.
"""

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from heady_node.launcher import log_tail, spawn, stop
from heady_shared.endpoints import is_quick_tunnel

NGROK_API = "http://127.0.0.1:4040"  # the agent's web_addr default
QUICK_TUNNEL_WARNING = (
    "Cloudflare quick tunnels (*.trycloudflare.com) do not carry SSE (streamed answers) and cap "
    "200 in-flight requests: use a named Cloudflare Tunnel with your own hostname, or ngrok."
)
_CF_READY = re.compile(r"Registered tunnel connection")
_NGROK_ERROR = re.compile(r"ERR_NGROK_(\d+)")
# https://ngrok.com/docs/errors/ : what each code means for a Heady node.
NGROK_HINTS = {
    "334": "this domain is already online from another agent: another node (or an old tab) uses "
    "the same NGROK_DOMAIN; give each node its own",
    "108": "this ngrok account already runs its maximum of simultaneous agents: each node needs "
    "its own account (NGROK_AUTHTOKEN_<n>) or a paid plan",
    "105": "the authtoken is not valid: copy it again from the ngrok dashboard",
    "107": "the authtoken was revoked or reset: copy the current one from the ngrok dashboard",
    "15002": "this plan needs a registered domain: set NGROK_DOMAIN_<n>",
}


class TunnelError(RuntimeError):
    pass


@dataclass(frozen=True)
class TunnelPlan:
    kind: str  # "ngrok" | "cloudflare"
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None  # known up front for a named Cloudflare Tunnel or a fixed ngrok domain
    port: int | None = None  # local engine port (ngrok: to find our tunnel in the agent's list)
    api_url: str | None = None  # ngrok agent API


def ngrok_plan(
    port: int,
    authtoken: str,
    *,
    domain: str | None = None,
    binary: str = "ngrok",
    api_url: str = NGROK_API,
) -> TunnelPlan:
    if not authtoken:
        raise TunnelError("NGROK_AUTHTOKEN is missing")
    argv = [binary, "http", f"http://127.0.0.1:{port}", "--log", "stdout", "--log-format", "logfmt"]
    url = None
    if domain:
        url = public_url(domain if "://" in domain else f"https://{domain}")
        argv += ["--url", url]
    # The token goes through the environment so it never shows up in `ps` or in logs.
    return TunnelPlan("ngrok", argv, {"NGROK_AUTHTOKEN": authtoken}, url, port, api_url)


def cloudflare_plan(token: str, hostname: str, *, binary: str = "cloudflared") -> TunnelPlan:
    """A token-run named tunnel takes its ingress from the dashboard: the public hostname's
    service there must be http://localhost:<engine port>."""
    if not token:
        raise TunnelError("CF_TUNNEL_TOKEN is missing")
    url = public_url(hostname if "://" in hostname else f"https://{hostname}")
    argv = [binary, "tunnel", "--no-autoupdate", "run"]
    return TunnelPlan("cloudflare", argv, {"TUNNEL_TOKEN": token}, url=url)


def public_url(url: str) -> str:
    """Normalise a tunnel URL the gateway will call; refuse what cannot work."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or not host:
        raise TunnelError(f"tunnel URL must be https://HOST, got {url!r}")
    if is_quick_tunnel(host):
        raise TunnelError(QUICK_TUNNEL_WARNING)
    return f"https://{parts.netloc}".rstrip("/")


def ngrok_url_from_api(payload: Any, port: int | None, expected: str | None) -> str | None:
    """Our endpoint's https URL from GET /api/tunnels ({"tunnels": [{"public_url", "config":
    {"addr"}}]}), or None while it is not listed. Another agent's tunnel is ignored."""
    tunnels = payload.get("tunnels") if isinstance(payload, dict) else None
    for t in tunnels if isinstance(tunnels, list) else ():
        if not isinstance(t, dict) or not isinstance(t.get("public_url"), str):
            continue
        addr = str((t.get("config") or {}).get("addr", ""))
        if port is not None and not addr.rstrip("/").endswith(f":{port}"):
            continue
        if not t["public_url"].startswith("https://"):
            continue
        url = public_url(t["public_url"])
        if expected and url != expected:
            raise TunnelError(f"ngrok serves {url}, not the configured {expected}")
        return url
    return None


def explain(kind: str, log_text: str) -> str:
    """A one-line reason for a failed agent, from the error codes in its log."""
    if kind == "ngrok":
        for code in _NGROK_ERROR.findall(log_text):
            if code in NGROK_HINTS:
                return f"ERR_NGROK_{code}: {NGROK_HINTS[code]}"
    return ""


def _fetch_json(url: str) -> Any:
    try:
        resp = httpx.get(url, timeout=2.0)
        return resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def open_tunnel(
    plan: TunnelPlan,
    *,
    log_path: Path,
    timeout: float = 60.0,
    command: list[str] | None = None,
    fetch: Callable[[str], Any] = _fetch_json,
) -> tuple[subprocess.Popen, str]:
    """Start the tunnel agent and wait until it is up; stops the agent (only) on failure."""
    proc = spawn(command or plan.argv, log_path=log_path, env=plan.env)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            text = ""
        try:
            if plan.kind == "ngrok":
                url = ngrok_url_from_api(fetch(f"{plan.api_url}/api/tunnels"), plan.port, plan.url)
            else:
                url = plan.url if _CF_READY.search(text) else None
        except TunnelError:
            stop(proc, grace=2.0)
            raise
        if url:
            return proc, url
        if proc.poll() is not None or time.monotonic() >= deadline:
            why = (
                f"exited with code {proc.returncode}"
                if proc.poll() is not None
                else f"gave no URL within {timeout:.0f}s"
            )
            stop(proc, grace=2.0)
            hint = explain(plan.kind, _read(log_path))
            raise TunnelError(
                f"{plan.kind} {why}"
                + (f" ({hint})" if hint else "")
                + f"; log tail:\n{log_tail(log_path)}"
            )
        time.sleep(0.2)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
