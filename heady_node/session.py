"""The notebook's imperative shell: one object that walks a Colab runtime to a live node.

Everything it decides is delegated to the pure modules (roles, gpu, presets, tunnel, status,
wrangler); this file only sequences processes and prints. `dry_run=True` swaps the GPU, the
engine and the tunnel for offline stand-ins (sim.node and heady_node.fake_tunnel) so CI can run
the very notebook the operator uploads.
"""

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from heady_node import gpu as gpu_mod
from heady_node import launcher, presets, status, tunnel, wrangler
from heady_node.colab import get_secret
from heady_node.roles import role_for_node

DRY_RUN_GPU = "Tesla T4, 15360 MiB\n"
DRY_RUN_TOKEN = "dry-run-node-token"


@dataclass
class NodeSession:
    node: int
    model: str | None = None
    tunnel_kind: str = "ngrok"  # or "cloudflare"
    dry_run: bool = False
    port: int = 8000
    health_timeout: float = 1800.0  # first start downloads the weights: minutes, not seconds
    tunnel_timeout: float = 60.0
    status_interval: float = 60.0
    log_dir: Path = field(default_factory=lambda: Path("/tmp/heady"))
    engine: list[str] | None = None  # command prefix; default `vllm serve`
    tunnel_command: list[str] | None = None  # replaces the ngrok/cloudflared argv
    gpu_runner: gpu_mod.Runner | None = None
    secret: Callable[[str], str] = get_secret
    out: Callable[[str], None] = print

    role: str = field(init=False)
    engine_proc: subprocess.Popen | None = field(init=False, default=None)
    tunnel_proc: subprocess.Popen | None = field(init=False, default=None)
    public_url: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.role = role_for_node(self.node)
        if self.tunnel_kind not in ("ngrok", "cloudflare"):
            raise ValueError("tunnel must be 'ngrok' or 'cloudflare'")
        if self.dry_run:
            self.engine = self.engine or [
                sys.executable,
                "-m",
                "sim.node",
                "--node",
                str(self.node),
            ]
            self.gpu_runner = self.gpu_runner or (lambda _argv: DRY_RUN_GPU)
            self.port = _free_port() if self.port == 8000 else self.port
            fake_url = f"https://heady-dry-run-node{self.node}.ngrok-free.app"
            self.tunnel_command = self.tunnel_command or [
                sys.executable, "-m", "heady_node.fake_tunnel",
                "--kind", self.tunnel_kind, "--url", fake_url,
            ]  # fmt: skip
            self.health_timeout = min(self.health_timeout, 60.0)
            self.status_interval = min(self.status_interval, 0.5)
        self.engine = self.engine or ["vllm", "serve"]

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _token(self) -> str:
        token = self.secret("NODE_TOKEN") or (DRY_RUN_TOKEN if self.dry_run else "")
        if not token:
            raise RuntimeError(
                "NODE_TOKEN is missing: add the cluster's shared token in Colab's Secrets panel "
                "(the same value as `npx wrangler secret put NODE_TOKEN`)"
            )
        return token

    def plan(self) -> presets.Preset:
        gpu = gpu_mod.detect_gpu(self.gpu_runner) if self.gpu_runner else gpu_mod.detect_gpu()
        preset = presets.preset_for(self.role, gpu.gpu_class, self.model)
        self.preset = preset
        self.out(f"GPU: {gpu.name} ({gpu.memory_gib:.1f} GiB) -> preset class {gpu.gpu_class.key}")
        self.out(f"Node {self.node}: role {self.role}, model {preset.model.repo}")
        if preset.model.params_b:
            need = presets.memory_estimate(preset.model, preset.max_model_len)
            self.out(
                f"Context {preset.max_model_len} tokens, dtype {preset.dtype}, quantisation "
                f"{preset.quantization or 'none'}; memory ~{need:.1f} of "
                f"{presets.budget(gpu.gpu_class, gpu.memory_gib):.1f} GiB allowed"
            )
        else:
            self.out("Custom model: not in the preset catalogue, memory not checked")
        return preset

    def start_engine(self) -> None:
        preset = getattr(self, "preset", None) or self.plan()
        token = self._token()
        assert self.engine is not None
        argv = presets.engine_argv(preset, port=self.port, api_key=token, engine=self.engine)
        log = self.log_dir / f"engine-node{self.node}.log"
        self.out("Starting: " + " ".join(presets.redact_argv(argv)))
        self.out(f"(engine log: {log})")
        self.engine_proc = launcher.spawn(argv, log_path=log)
        try:
            waited = launcher.wait_healthy(
                self.local_url,
                self.engine_proc,
                log_path=log,
                timeout=self.health_timeout,
                on_wait=lambda s: self.out(f"... still loading ({s:.0f}s)"),
            )
            reply = launcher.smoke_test(self.local_url, token, preset.model.repo)
        except launcher.EngineError:
            self.stop()
            raise
        self.out(f"Engine healthy after {waited:.1f}s; test answer: {reply[:60]!r}")

    def open_tunnel(self) -> str:
        log = self.log_dir / f"tunnel-node{self.node}.log"
        if self.tunnel_kind == "ngrok":
            plan = tunnel.ngrok_plan(
                self.port,
                self.secret("NGROK_AUTHTOKEN") or ("dry-run" if self.dry_run else ""),
                domain=self.secret("NGROK_DOMAIN") or None,
            )
        else:
            host = self.secret("CF_TUNNEL_HOSTNAME") or (
                f"node{self.node}.example.com" if self.dry_run else ""
            )
            if not host:
                raise tunnel.TunnelError(
                    "CF_TUNNEL_HOSTNAME is missing: the public hostname routed to "
                    f"http://localhost:{self.port} in the tunnel's dashboard"
                )
            token = self.secret("CF_TUNNEL_TOKEN") or ("dry-run" if self.dry_run else "")
            plan = tunnel.cloudflare_plan(token, host)
        try:
            self.tunnel_proc, url = tunnel.open_tunnel(
                plan, log_path=log, timeout=self.tunnel_timeout, command=self.tunnel_command
            )
        except tunnel.TunnelError:
            self.stop()
            raise
        self.public_url = url
        self.out("")
        for line in wrangler.paste_block(self.node, url):
            self.out(line)
        self.out("")
        return url

    def status_once(self) -> str:
        clock = datetime.now().strftime("%H:%M:%S")
        try:
            resp = httpx.get(f"{self.local_url}/metrics", timeout=5.0)
            resp.raise_for_status()
            snap = status.snapshot(status.parse_metrics(resp.text))
            line = status.status_line(clock, self.node, self.role, snap)
        except httpx.HTTPError as exc:
            line = status.status_line(clock, self.node, self.role, None, type(exc).__name__)
        for name, proc in (("engine", self.engine_proc), ("tunnel", self.tunnel_proc)):
            if proc is not None and proc.poll() is not None:
                line += f" | {name} EXITED ({proc.returncode})"
        return line

    def keep_alive(self, rounds: int | None = None) -> None:
        """Print a status line every `status_interval` s until stopped (Colab's stop button
        raises KeyboardInterrupt), then shut everything down. `rounds` bounds it for dry runs."""
        if self.dry_run and rounds is None:
            rounds = 2
        self.out("Serving. Keep this tab open; stop this cell to shut the node down.")
        done = 0
        try:
            while rounds is None or done < rounds:
                self.out(self.status_once())
                done += 1
                if rounds is None or done < rounds:
                    time.sleep(self.status_interval)
        except KeyboardInterrupt:
            self.out("Stopping ...")
        finally:
            self.stop()

    def stop(self) -> None:
        for proc in (self.tunnel_proc, self.engine_proc):
            if proc is not None:
                launcher.stop(proc, grace=10.0)
        self.tunnel_proc = self.engine_proc = None
        self.out(f"Node {self.node} stopped.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
