"""The node's imperative shell: walks any Linux GPU host (a Colab runtime, a rented box) to a live
node. `heady-node serve` and the notebook both drive this one object.

Order matters: `preflight` checks everything that can be checked without the model (GPU, preset,
token, every tunnel setting) so a typo costs seconds, not a 10-minute weight download. A tunnel
failure never touches the engine: it is reported and `open_tunnel` can simply be run again.
`dry_run=True` swaps the GPU, the engine and the tunnel agent for offline stand-ins (sim.node and
heady_node.dry_run_tunnel) so CI runs the very code and notebook the operator runs.
"""

import contextlib
import dataclasses
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from heady_node import (
    batch_worker,
    guard,
    image_presets,
    launcher,
    presets,
    settings,
    status,
    tunnel,
    wrangler,
)
from heady_node import gpu as gpu_mod
from heady_node.colab import get_secret
from heady_node.finetune import runner as train_runner
from heady_node.roles import role_for_node
from heady_shared.metrics import parse_metrics
from heady_shared.routes import DEFAULT_POOLS, Pool, parse_routes, role_of

DRY_RUN_GPU = "Tesla T4, 15360 MiB, 7.5, 550.54.15\n"
DRY_RUN_TOKEN = "dry-run-node-token"


def dry_run_secrets(node: int) -> dict[str, str]:
    """What a dry run uses when a secret is not set: fake, but shaped like the real ones."""
    return {
        "NODE_TOKEN": DRY_RUN_TOKEN,
        f"{settings.CF_TOKEN}_{node}": "dry-run-tunnel-token",
        f"{settings.CF_HOSTNAME}_{node}": f"node{node}.example.com",
        f"{settings.NGROK_TOKEN}_{node}": "dry-run-authtoken",
        f"{settings.NGROK_DOMAIN}_{node}": f"heady-dry-run-node{node}.ngrok-free.dev",
    }


@dataclass
class NodeSession:
    node: int
    model: str | None = None
    tunnel_kind: str = "cloudflare"  # or "ngrok", or "none" (expose it yourself)
    dry_run: bool = False
    port: int = 8000
    media_domains: Sequence[str] = ()  # vision: hosts image URLs may come from (default: none)
    ngrok_api: str = tunnel.NGROK_API
    routes: str | None = None  # the gateway's ROUTES var (JSON) when it is not the default
    health_timeout: float = 1800.0  # first start downloads the weights: minutes, not seconds
    tunnel_timeout: float = 60.0
    status_interval: float = 60.0
    log_dir: Path = field(default_factory=lambda: Path("/tmp/heady"))
    engine: list[str] | None = None  # command prefix; default `vllm serve`
    images: bool = True  # vision nodes: run the image engine next to vLLM
    image_model: str | None = None  # image checkpoint override (heady_node.image_presets)
    image_timeout: float = 1800.0  # first start downloads the image weights too
    tunnel_command: list[str] | None = None  # replaces the ngrok/cloudflared argv
    gpu_runner: gpu_mod.Runner | None = None
    secret: Callable[[str], str] = get_secret
    out: Callable[[str], None] = print

    role: str = field(init=False)
    pools: Mapping[str, Pool] = field(init=False)
    gpu: gpu_mod.Gpu | None = field(init=False, default=None)
    preset: presets.Preset | None = field(init=False, default=None)
    served_names: tuple[str, ...] = field(init=False, default=())
    tunnel_settings: settings.TunnelSettings | None = field(init=False, default=None)
    image_preset: image_presets.ImagePreset | None = field(init=False, default=None)
    image_port: int | None = field(init=False, default=None)
    engine_proc: subprocess.Popen | None = field(init=False, default=None)
    image_proc: subprocess.Popen | None = field(init=False, default=None)
    tunnel_proc: subprocess.Popen | None = field(init=False, default=None)
    worker_proc: subprocess.Popen | None = field(init=False, default=None)  # batch worker
    train_worker: train_runner.TrainThread | None = field(init=False, default=None)
    # Owns the engine process once the train worker runs: it stops and restarts it for training.
    train_engine: train_runner.RestartEngine | None = field(init=False, default=None)
    engine_cmd: tuple[list[str], dict[str, str], Path] | None = field(init=False, default=None)
    public_url: str | None = field(init=False, default=None)
    # The train thread drains and restarts the batch worker (pause/resume_batch_worker).
    _worker_lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _worker_paused: bool = field(init=False, default=False)
    _closing: bool = field(init=False, default=False)
    _draining_worker: subprocess.Popen | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        role_for_node(self.node)  # 1..8
        self.pools = DEFAULT_POOLS
        if self.routes and self.routes.strip():
            pools, errors = parse_routes(self.routes)
            if errors:
                raise settings.SettingsError("; ".join(errors))
            self.pools = pools
        role = role_of(self.node, self.pools)
        if role is None:
            raise settings.SettingsError(f"node {self.node} is in no role's pair in ROUTES")
        self.role = role
        if self.tunnel_kind not in settings.TUNNEL_KINDS:
            raise ValueError(f"tunnel must be one of {', '.join(settings.TUNNEL_KINDS)}")
        if self.dry_run:
            real, fake = self.secret, dry_run_secrets(self.node)
            self.secret = lambda name: real(name) or fake.get(name, "")
            sim = [sys.executable, "-m", "sim.node", "--node", str(self.node)]
            self.engine = self.engine or sim
            self.gpu_runner = self.gpu_runner or (lambda _argv: DRY_RUN_GPU)
            self.port = _free_port() if self.port == 8000 else self.port
            self.health_timeout = min(self.health_timeout, 60.0)
            self.status_interval = min(self.status_interval, 0.5)
            if self.tunnel_command is None and self.tunnel_kind != "none":
                api_port = _free_port()
                self.ngrok_api = f"http://127.0.0.1:{api_port}"
                url = f"https://{fake[f'{settings.NGROK_DOMAIN}_{self.node}']}"
                self.tunnel_command = [
                    sys.executable, "-m", "heady_node.dry_run_tunnel",
                    "--kind", self.tunnel_kind, "--url", url,
                    "--api-port", str(api_port), "--addr", f"http://127.0.0.1:{self.port}",
                ]  # fmt: skip
        self.engine = self.engine or ["vllm", "serve"]

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _token(self) -> str:
        token = self.secret("NODE_TOKEN").strip()
        if not token:
            raise settings.SettingsError(
                "NODE_TOKEN is missing: the cluster's shared node token (Colab: Secrets panel; "
                "elsewhere: the environment), the value of `npx wrangler secret put NODE_TOKEN`"
            )
        return token

    def preflight(self) -> presets.Preset:
        """GPU, preset, node token and tunnel settings: everything checkable before the model."""
        self.gpu = gpu_mod.detect_gpu(self.gpu_runner) if self.gpu_runner else gpu_mod.detect_gpu()
        preset = presets.preset_for(self.role, self.gpu.gpu_class, self.model, bf16=self.gpu.bf16)
        self._token()
        self.tunnel_settings = settings.tunnel_settings(self.tunnel_kind, self.node, self.secret)
        self.preset = preset
        self.served_names = presets.served_model_names(preset.model.repo, self.node, self.pools)
        self.out(self.gpu.describe())
        self.out(f"Node {self.node}: role {self.role}, model {preset.model.repo}")
        self.out("Answers to model names: " + ", ".join(self.served_names))
        if preset.model.params_b:
            need = presets.memory_estimate(preset.model, preset.max_model_len)
            allowed = presets.budget(self.gpu.gpu_class, self.gpu.memory_gib)
            self.out(
                f"Context {preset.max_model_len} tokens, dtype {preset.dtype}, quantisation "
                f"{preset.quantization or 'none'} (vLLM reads it from the checkpoint); "
                f"memory ~{need:.1f} of {allowed:.1f} GiB allowed"
            )
        else:
            self.out("Custom model: not in the preset catalogue, memory not checked")
        if preset.vision:
            hosts = ", ".join(self.media_domains) or "none (data: URLs only)"
            self.out(
                f"Images: at most {preset.vision.images_per_prompt} per prompt, "
                f"{preset.vision.max_pixels} pixels each; image URLs allowed from: {hosts}"
            )
        if preset.vision and self.images and not self.dry_run:
            preset = self._plan_images(preset)
        elif preset.vision and self.dry_run:
            self.out("Images: the dry-run stand-in engine (sim.node) answers /v1/images/* itself")
        ts = self.tunnel_settings
        if ts.kind == "none":
            self.out("Tunnel: none (expose the port yourself, behind HTTPS)")
        else:
            where = ts.address.value or "the account's dev domain"
            self.out(f"Tunnel: {ts.kind} via {ts.token.source}, address {where}")
        return preset

    def _plan_images(self, preset: presets.Preset) -> presets.Preset:
        """The image engine's preset on this card, checked against the vision model's memory;
        vLLM's share of the card is lowered to leave the image engine its room."""
        assert self.gpu is not None
        img = image_presets.image_preset(self.gpu.gpu_class, self.image_model)
        problems = image_presets.joint_problems(preset, img)
        if problems:
            raise presets.PresetError(
                "the image engine does not fit next to the vision model: "
                + "; ".join(problems)
                + " (start with --no-images to serve chat only)"
            )
        preset = dataclasses.replace(preset, gpu_memory_utilization=img.vllm_utilization)
        self.preset = preset
        self.image_preset = img
        self.image_port = _free_port()
        m = img.model
        self.out(
            f"Images: {m.repo} ({m.native_side}x{m.native_side}, {m.steps} step(s), ~"
            f"{img.seconds_per_image:g} s/image estimated), up to {img.max_n} per request; "
            f"vLLM gets {img.vllm_utilization:.2f} of the card, the image engine "
            f"~{img.image_memory_gib():.1f} GiB"
        )
        return preset

    @property
    def images_url(self) -> str | None:
        return f"http://127.0.0.1:{self.image_port}" if self.image_port else None

    def start_engine(self) -> None:
        if self.preset is None:
            self.preflight()
        preset, token = self.preset, self._token()
        assert preset is not None and self.engine is not None
        argv = presets.engine_argv(
            preset,
            port=self.port,
            engine=self.engine,
            served_names=self.served_names,
            media_domains=self.media_domains,
        )
        env = presets.engine_env(preset, token, self.images_url, **self._lora_env(preset))
        log = self.log_dir / f"engine-node{self.node}.log"
        self.out("Starting: " + shlex.join(presets.redact_argv(argv)))
        self.out(f"(engine log: {log})")
        self.engine_proc = launcher.spawn(argv, log_path=log, env=env)
        self.engine_cmd = (argv, env, log)
        try:
            waited = launcher.wait_healthy(
                self.local_url,
                self.engine_proc,
                log_path=log,
                timeout=self.health_timeout,
                on_wait=lambda s: self.out(f"... still loading ({s:.0f}s)"),
            )
            reply = launcher.smoke_test(self.local_url, token, preset.model.repo)
            guarded = launcher.guard_active(self.local_url)
        except launcher.EngineError:
            self.stop()
            raise
        self.out(f"Engine healthy after {waited:.1f}s; test answer: {reply[:60]!r}")
        if guarded:
            self.out("Guard active: only /v1/*, /health and /metrics answer, with the token")
        elif self.dry_run:
            self.out("Guard not loaded: the dry-run stand-in engine is not vLLM")
        else:
            self.stop()
            raise launcher.EngineError(
                "the engine answers paths the node guard must hide (is heady_node importable in "
                "vLLM's environment?); stopped it rather than publish it"
            )
        if self.image_preset is not None:
            self.start_images()
        self.start_batch_worker()
        self.start_train_worker()

    def _lora_env(self, preset: presets.Preset) -> dict[str, str]:
        """LoRA presets: a cache directory for the resolver plugin, and the gateway URL and
        credential it fetches adapters with (both or neither, as for the batch worker)."""
        if not preset.lora:
            return {}
        cache = self.log_dir / f"lora-cache-node{self.node}"
        cache.mkdir(parents=True, exist_ok=True)
        url = self.secret(batch_worker.GATEWAY_ENV).strip()
        credential = self.secret(batch_worker.CREDENTIAL_ENV).strip()
        if not (url and credential):
            return {"lora_cache_dir": str(cache)}
        return {"lora_cache_dir": str(cache), "gateway_url": url, "credential": credential}

    def image_argv(self) -> list[str]:
        assert self.image_preset is not None and self.gpu is not None
        names = (self.image_preset.model.repo, *self.served_names[1:])
        argv = [
            sys.executable, "-m", "heady_node.image_server",
            "--gpu", self.gpu.gpu_class.key,
            "--port", str(self.image_port),
            "--served-model-name", *dict.fromkeys(names),
        ]  # fmt: skip
        if self.image_model:
            argv += ["--model", self.image_model]
        return argv

    def start_images(self) -> None:
        """After vLLM is up (its start-up measures free memory; nothing else may allocate on the
        card meanwhile). A failure here leaves chat serving: the node then simply does not
        report image generation, and the gateway sends image requests elsewhere."""
        argv = self.image_argv()
        log = self.log_dir / f"images-node{self.node}.log"
        self.out("Starting the image engine: " + shlex.join(argv))
        self.out(f"(image engine log: {log})")
        self.image_proc = launcher.spawn(argv, log_path=log, env={guard.TOKEN_ENV: self._token()})
        try:
            waited = launcher.wait_healthy(
                self.images_url or "",
                self.image_proc,
                log_path=log,
                timeout=self.image_timeout,
                on_wait=lambda s: self.out(f"... image model still loading ({s:.0f}s)"),
            )
        except launcher.EngineError as exc:
            launcher.stop(self.image_proc, grace=10.0)
            self.image_proc = None
            self.out(f"Image engine failed, serving chat only: {exc}")
            return
        self.out(f"Image engine healthy after {waited:.1f}s (drew a warm-up image)")

    def start_batch_worker(self) -> bool:
        """With HEADY_GATEWAY_URL and the secret HEADY_NODE_CREDENTIAL set, run the batch worker
        (heady_node.batch_worker) beside the engine: it pulls batch work from the gateway."""
        url = self.secret(batch_worker.GATEWAY_ENV).strip()
        credential = self.secret(batch_worker.CREDENTIAL_ENV).strip()
        if not (url and credential):
            if url or credential:
                self.out(
                    f"Batch worker not started: it needs both {batch_worker.GATEWAY_ENV} and "
                    f"{batch_worker.CREDENTIAL_ENV}"
                )
            return False
        log = self.log_dir / f"batch-worker-node{self.node}.log"
        try:
            self.worker_proc = batch_worker.start_process(
                url, credential, self.local_url, self.node,
                engine_token=self._token(), log_path=log, always=self.role == "batch",
                concurrency=self.preset.max_num_seqs if self.preset else None,
            )  # fmt: skip
        except ValueError as exc:  # a bad gateway URL: the engine still serves interactive work
            self.out(f"Batch worker not started: {exc}")
            return False
        self.out(f"Batch worker: pulling batch work from {url} (log: {log})")
        return True

    def pause_batch_worker(self) -> bool | None:
        """Drain the batch worker for a training job (heady_node.batch_worker.drain): running
        lines finish and are committed, the rest goes back to the gateway at once. Returns
        whether it exited cleanly (None: no worker ran)."""
        with self._worker_lock:
            proc, self.worker_proc = self.worker_proc, None
            self._worker_paused = proc is not None
            self._draining_worker = proc
        if proc is None:
            return None
        start = time.monotonic()
        try:
            clean = batch_worker.drain(proc, batch_worker.DRAIN_S + batch_worker.DRAIN_SLACK_S)
        finally:
            self._draining_worker = None
        self.out(
            f"Batch worker drained for training in {time.monotonic() - start:.1f}s"
            + ("" if clean else f" (not cleanly: exit {proc.returncode})")
        )
        return clean

    def resume_batch_worker(self) -> bool:
        """After training (the engine restored, or its restore failed: the worker then gets no
        shards until the engine answers): start the worker drained for it again."""
        with self._worker_lock:
            if self._closing or not self._worker_paused or self.worker_proc is not None:
                return False
            self._worker_paused = False
            return self.start_batch_worker()

    def trains(self) -> bool:
        """The batch pair trains; HEADY_TRAIN=1/0 (secret or environment) overrides."""
        return train_runner.may_train(self.role, self.secret(train_runner.TRAIN_ENV))

    def start_train_worker(self) -> bool:
        """On a node that trains, with the gateway URL and credential set, lease fine-tuning
        jobs (heady_node.finetune.runner) in a thread beside the engine; the runner stops this
        session's engine for a job and starts it again with the same command afterwards."""
        url = self.secret(batch_worker.GATEWAY_ENV).strip()
        credential = self.secret(batch_worker.CREDENTIAL_ENV).strip()
        if not (url and credential and self.trains()):
            return False
        assert self.preset is not None and self.engine_cmd is not None
        try:
            url = batch_worker.check_gateway_url(url)
        except ValueError as exc:
            self.out(f"Train worker not started: {exc}")
            return False
        argv, env, log = self.engine_cmd
        self.train_engine = train_runner.RestartEngine(
            argv=argv, env=env, log_path=log, base_url=self.local_url, proc=self.engine_proc,
            health_timeout_s=self.health_timeout,
        )  # fmt: skip
        gpu = None if self.dry_run or self.gpu is None else self.gpu.gpu_class
        # Batch work first: the worker drains before the engine stops, restarts after it.
        engine = train_runner.HandOver(
            self.train_engine, self.pause_batch_worker, self.resume_batch_worker
        )
        runner = train_runner.FineTuneRunner(
            gateway_url=url, credential=credential, engine=engine, gpu=gpu,
            max_model_len=self.preset.max_model_len, models=self.served_names,
            work_dir=self.log_dir / f"train-node{self.node}",
            poll_s=min(self.status_interval, 10.0) if self.dry_run else 10.0,
        )  # fmt: skip
        self.train_worker = train_runner.TrainThread(runner)
        self.train_worker.start()
        self.out(f"Train worker: leasing fine-tuning jobs from {url} (frees the GPU per job)")
        return True

    def current_engine(self) -> subprocess.Popen | None:
        """The engine process: the train worker's once it runs (None while it trains)."""
        return self.train_engine.proc if self.train_engine else self.engine_proc

    def open_tunnel(self) -> str | None:
        """Start (or restart) the tunnel; on failure the engine keeps running and this can be run
        again. Returns the public URL, or None for tunnel 'none'."""
        ts = self.tunnel_settings
        if ts is None:
            raise settings.SettingsError("run preflight() first")
        plan = ts.plan(self.port, ngrok_api=self.ngrok_api)
        if plan is None:
            self.out(f"No tunnel: the gateway must reach {self.local_url} through your own HTTPS")
            return None
        if self.tunnel_proc is not None:
            launcher.stop(self.tunnel_proc, grace=5.0)
            self.tunnel_proc = None
        log = self.log_dir / f"tunnel-node{self.node}.log"
        try:
            self.tunnel_proc, url = tunnel.open_tunnel(
                plan, log_path=log, timeout=self.tunnel_timeout, command=self.tunnel_command
            )
        except tunnel.TunnelError as exc:
            self.public_url = None
            engine = self.current_engine()
            running = engine is not None and engine.poll() is None
            self.out(
                f"Tunnel failed: {exc}\n"
                + (f"The engine keeps running at {self.local_url}; " if running else "")
                + "fix the tunnel settings and open the tunnel again."
            )
            raise
        self.public_url = url
        self.out("")
        for line in wrangler.paste_block(self.node, url, self.role):
            self.out(line)
        self.out("")
        return url

    def status_once(self) -> str:
        clock = datetime.now().strftime("%H:%M:%S")
        try:
            resp = httpx.get(
                f"{self.local_url}/metrics",
                headers={"Authorization": f"Bearer {self._token()}"},
                timeout=5.0,
            )
            resp.raise_for_status()
            snap = status.snapshot(parse_metrics(resp.text))
            line = status.status_line(clock, self.node, self.role, snap)
        except httpx.HTTPError as exc:
            line = status.status_line(clock, self.node, self.role, None, type(exc).__name__)
        procs = (
            ("engine", self.current_engine()),
            ("images", self.image_proc),
            ("tunnel", self.tunnel_proc),
            ("batch worker", self.worker_proc),
        )
        for name, proc in procs:
            if proc is not None and proc.poll() is not None:
                line += f" | {name} EXITED ({proc.returncode})"
        if self.train_engine is not None and self.train_engine.proc is None:
            line += " | engine STOPPED for training"
        if self.train_worker is not None and not self.train_worker.alive():
            line += " | train worker EXITED"
        if self.tunnel_kind != "none" and self.public_url is None:
            line += " | tunnel DOWN"
        return line

    def keep_alive(self, rounds: int | None = None, retry_tunnel: bool = False) -> None:
        """Print a status line every `status_interval` s until stopped (Colab's stop button
        raises KeyboardInterrupt), then shut everything down. `retry_tunnel` reopens a failed or
        exited tunnel each round. `rounds` bounds it for dry runs."""
        if self.dry_run and rounds is None:
            rounds = 2
        self.out("Serving. Stop this cell (or press Ctrl+C) to shut the node down.")
        done = 0
        try:
            while rounds is None or done < rounds:
                tunnel_gone = self.tunnel_proc is None or self.tunnel_proc.poll() is not None
                if retry_tunnel and self.tunnel_kind != "none" and tunnel_gone:
                    # open_tunnel reports the failure; the next round tries again.
                    with contextlib.suppress(tunnel.TunnelError):
                        self.open_tunnel()
                self.out(self.status_once())
                done += 1
                if rounds is None or done < rounds:
                    time.sleep(self.status_interval)
        except KeyboardInterrupt:
            self.out("Stopping ...")
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the tunnel and the engine (idempotent: says so only when something ran)."""
        trained = self.train_worker is not None
        with self._worker_lock:
            self._closing = True  # a training job ending now starts no batch worker again
        if self.train_engine is not None:
            self.train_engine.closed = True  # a job ending now starts no engine again
        if self.train_worker is not None:
            self.train_worker.stop(timeout=10.0)
        engine = self.current_engine()
        running = (self.worker_proc, self.tunnel_proc, self.image_proc, engine)
        procs = [p for p in running if p is not None]
        for proc in procs:
            launcher.stop(proc, grace=10.0)
        draining = self._draining_worker  # a train thread's drain still under way: end it
        if draining is not None:
            launcher.stop(draining, grace=10.0)
        self.worker_proc = self.tunnel_proc = self.engine_proc = self.image_proc = None
        self.train_worker = self.train_engine = None
        self.public_url = None
        if procs or trained:
            self.out(f"Node {self.node} stopped.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
