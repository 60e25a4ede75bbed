"""A fleet of simulated GPU nodes in a background event-loop thread, plus a control API.

In-process (pytest)::

    with Fleet(count=8) as fleet:
        fleet.set(3, "status", status=429, headers={"Retry-After": "7"})
        ...

Stand-alone (``make dev``, subprocess tests)::

    python -m sim.fleet [--count 8] [--host 127.0.0.1] [--base-port 0] [--api-key KEY]
                        [--control-port 0] [--exit-on-stdin-eof] [--dev-mode]
                        [--served-model-name N=NAME[,NAME...]]...
                        [--capacity N=[MAX_NUM_SEQS]:TOKEN_S]...

prints one JSON line ``{"nodes": {"1": url, ...}, "control": url}`` once everything listens.

Batch workers: ``start_workers(gateway_url, node_secret)`` (control API ``POST /workers``) runs
the real ``heady_node.batch_worker`` beside nodes 7-8, each with its node credential, against
its simulated engine. The fleet owns them: ``kill(n)`` (``POST /nodes/{n}/kill``) takes node n
and its worker down together (the worker's process group SIGKILLed, the node refusing
connections: a Colab VM that died), ``revive(n)`` (``POST /nodes/{n}/revive``) brings both
back, ``reset()`` revives every dead worker too, ``stop()`` stops them.

Fine-tuning (``make dev``): ``serve_lora(gateway_url, node_secret)`` (``POST /lora``) gives every
node whose preset serves LoRA (``heady_node.presets.served_capabilities``: the text roles) vLLM's
LoRA semantics (``sim.node.lora``) with heady_node's real resolver fetching adapters from the
gateway under the node's credential, and has it report ``lora``. ``start_trainers(gateway_url,
node_secret, python)`` (``POST /trainers``) runs the real fine-tuning runner
(``heady_node.finetune.runner --gpu cpu --dev-base``, in the torch venv's ``python``) beside nodes
7-8: it trains a tiny random stand-in under the served base's name and hands the engine over
through this control API (``POST /nodes/{n}/engine/stop``: the node's batch worker drained, then
the engine down, refusing connections as a stopped vLLM; ``.../engine/start``: engine up with no
adapter loaded, worker started again). ``kill``/``revive`` take the trainer down and up with its
node; ``reset()`` revives dead trainers and leaves a node that is training down (its trainer
holds the GPU; the trainer brings it back).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from heady_node import batch_worker, launcher
from heady_node.finetune.runner import CREDENTIAL_ENV as TRAIN_CREDENTIAL_ENV
from heady_node.gpu import GPU_CLASSES
from heady_node.presets import Preset, preset_for, served_capabilities, served_model_names
from heady_shared import capabilities as caps
from heady_shared.nodeauth import node_credential
from heady_shared.routes import DEFAULT_POOLS, NODE_COUNT, role_of
from sim.node import DEFAULT_MODEL, Capacity, Node, RecordedRequest, parse_mode
from sim.node.capacity import UNLIMITED, parse_capacity
from sim.node.images import ImageSim, image_sim_for
from sim.node.lora import LoraRegistry, gateway_resolver
from sim.node.record import HISTORY
from sim.server import HTTPServer, Request, Response

__all__ = [
    "BATCH_CAPACITY",
    "BATCH_NODES",
    "NODE_MODELS",
    "Fleet",
    "FleetProcess",
    "FleetProcessError",
    "TrainerSpec",
    "WorkerSpec",
    "default_served_names",
    "lora_nodes",
    "main",
    "trainer_argv",
]

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the trainers import heady_node from it


# The GPU each node of the default fleet stands in for: a T4 on odd nodes, an L4 on even ones,
# so the two nodes of a pair serve different models, as they do whenever Colab hands them
# different GPUs.
# The nodes whose workers always take batch work: the batch pair of the default route table.
BATCH_NODES: tuple[int, ...] = DEFAULT_POOLS["batch"].pair
NODE_GPUS: dict[int, str] = {n: "t4" if n % 2 else "l4" for n in range(1, NODE_COUNT + 1)}


def _preset(n: int) -> Preset:
    """The node side's preset (heady_node/presets.py) for node ``n``'s role on its GPU."""
    role = role_of(n)
    assert role is not None, f"node {n} is in no role's pair"  # the default table pairs all
    return preset_for(role, GPU_CLASSES[NODE_GPUS[n]])


# The checkpoint each node of the default fleet serves, read from the presets so the two
# cannot drift apart.
NODE_MODELS: dict[int, str] = {n: _preset(n).model.repo for n in NODE_GPUS}


# The batch pair's engines in `make dev` and the batch bench: the preset's --max-num-seqs (T4:
# 64 sequences of Qwen2.5-3B; L4: 128 of Qwen2.5-7B-AWQ) and a decode step time estimated from
# memory bandwidth (not measured on a GPU): a step reads the weights once plus the running
# sequences' KV cache. T4 (320 GB/s): 6.2 GB of fp16 weights + 64 x ~1k tokens x 36 KiB of KV
# = ~8.5 GB -> ~27 ms, about 50 ms with Turing's attention kernels and scheduling overhead.
# L4 (300 GB/s): ~5.5 GB of AWQ weights + 128 x ~1k tokens x 56 KiB = ~13 GB -> ~42 ms.
# So ~1,300 and ~3,200 generated tokens/s at a full batch: what such cards sustain.
BATCH_TOKEN_S: dict[str, float] = {"t4": 0.05, "l4": 0.04}
BATCH_CAPACITY: dict[int, Capacity] = {
    n: Capacity(_preset(n).max_num_seqs, BATCH_TOKEN_S[NODE_GPUS[n]]) for n in BATCH_NODES
}


def default_capabilities(n: int) -> tuple[str, ...]:
    """What vLLM serves on node ``n`` as the node side starts it (chat; image input on the
    vision pair): ``heady_node.presets.served_capabilities``, less ``lora``: a simulated node
    serves adapters only once it has a LoRA registry (``Fleet.serve_lora``, or a test's)."""
    have = served_capabilities(_preset(n)) if n in NODE_GPUS else (caps.CHAT,)
    return tuple(c for c in have if c != caps.LORA)


def lora_nodes(count: int = NODE_COUNT) -> tuple[int, ...]:
    """The nodes whose preset starts vLLM with --enable-lora (the text roles)."""
    return tuple(
        n for n in range(1, count + 1)
        if n in NODE_GPUS and caps.LORA in served_capabilities(_preset(n))
    )  # fmt: skip


def default_images(n: int, seconds_per_image: float | None = None) -> ImageSim | None:
    """The image engine beside vLLM on the vision pair (heady_node.image_presets for the
    node's GPU); None elsewhere. ``seconds_per_image`` None: the preset's estimate."""
    if n not in NODE_GPUS or _preset(n).vision is None:
        return None
    return image_sim_for(NODE_GPUS[n], seconds_per_image)


def default_served_names(n: int, pools: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """What node ``n`` answers to, exactly as the node side starts it
    (``heady_node.presets.served_model_names``): its checkpoint's repo id, then every role
    whose pair or fallback chain contains it, so a request that says ``"model": "<role>"``
    succeeds on every node the plan may send it to."""
    pools = DEFAULT_POOLS if pools is None else pools
    return served_model_names(NODE_MODELS.get(n, DEFAULT_MODEL), n, pools)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Where the fleet's batch workers pull work from, and as whom: node n authenticates with
    ``node_credential(node_secret, n)`` (what the gateway's NODE_SECRET derives)."""

    gateway_url: str
    node_secret: str
    nodes: tuple[int, ...] = BATCH_NODES
    log_dir: Path | None = None  # worker-<n>.log each; None: a fresh temporary directory

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> WorkerSpec:
        """From the control API's JSON; raises ValueError with a readable message."""
        url, secret = body.get("gateway_url"), body.get("node_secret")
        nodes, log_dir = body.get("nodes", list(BATCH_NODES)), body.get("log_dir")
        if not isinstance(url, str) or not isinstance(secret, str) or not secret:
            raise ValueError("'gateway_url' and 'node_secret' must be non-empty strings")
        batch_worker.check_gateway_url(url)
        if not isinstance(nodes, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in nodes
        ):
            raise ValueError("'nodes' must be a list of node numbers")
        if log_dir is not None and not isinstance(log_dir, str):
            raise ValueError("'log_dir' must be a string")
        return cls(url, secret, tuple(nodes), Path(log_dir) if log_dir else None)


@dataclass(frozen=True, slots=True)
class TrainerSpec:
    """The fleet's trainers (make dev): the real fine-tuning runner beside each of ``nodes``
    with the node's credential, run by ``python`` (the torch venv's interpreter, Python 3.11).
    ``drain_s``: how long the hand-over waits for the node's batch worker to drain; ``poll_s``
    / ``poll_max_s``: the runner's wait between empty asks (doubling up to the max)."""

    gateway_url: str
    node_secret: str
    python: str
    nodes: tuple[int, ...] = BATCH_NODES
    log_dir: Path | None = None  # trainer-<n>.log and train-node<n>/ each; None: a temp dir
    drain_s: float = 60.0
    poll_s: float = 2.0
    poll_max_s: float = 10.0

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> TrainerSpec:
        """From the control API's JSON; raises ValueError with a readable message."""
        w = WorkerSpec.parse({k: body[k] for k in body if k in ("gateway_url", "node_secret",
                                                                "nodes", "log_dir")})  # fmt: skip
        python = body.get("python")
        if not isinstance(python, str) or not python:
            raise ValueError("'python' must be the path of the torch venv's interpreter")
        times = {}
        for key in ("drain_s", "poll_s", "poll_max_s"):
            if key in body:
                v = body[key]
                if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
                    raise ValueError(f"'{key}' must be a positive number")
                times[key] = float(v)
        return cls(w.gateway_url, w.node_secret, python, w.nodes, w.log_dir, **times)


def trainer_argv(
    spec: TrainerSpec, node: int, names: Sequence[str], control_url: str, work_dir: Path
) -> list[str]:
    """The runner's command for node ``node`` (the credential goes through the environment):
    the CPU, the dev stand-in base, the node's served names as the models it trains for, its
    preset's context, the fleet's control API for the engine hand-over."""
    argv = [spec.python, "-m", "heady_node.finetune.runner", "--gateway", spec.gateway_url]
    for name in names:
        argv += ["--model", name]
    argv += ["--gpu", "cpu", "--dev-base", "--max-model-len", str(_preset(node).max_model_len)]
    argv += ["--engine-control", f"{control_url}/nodes/{node}", "--work-dir", str(work_dir)]
    argv += ["--poll", repr(spec.poll_s), "--poll-max", repr(spec.poll_max_s)]
    return argv


def _drain_worker(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Let node's batch worker finish what it holds and exit before its engine goes down
    (``heady_node.batch_worker.drain``): True if it did within ``timeout_s``."""
    return batch_worker.drain(proc, timeout_s)


T = TypeVar("T")
_JSON = ("content-type", "application/json")
_NODE_PATH = re.compile(r"^/nodes/(\d+)(/requests|/kill|/revive|/engine/stop|/engine/start)?$")


class Fleet:
    """``count`` nodes numbered 1..count, served by one asyncio loop in a daemon thread.

    All public methods are thread-safe and block until their effect is in place (e.g. after
    ``set(n, "refuse")`` returns, connecting to node n is refused)."""

    def __init__(
        self,
        count: int = NODE_COUNT,
        host: str = "127.0.0.1",
        api_key: str | None = None,
        *,
        base_port: int = 0,
        control_port: int | None = None,
        served_names: Mapping[int, Sequence[str]] | None = None,
        dev_mode: bool = False,
        capacity: Mapping[int, Capacity] | None = None,
        history: int = HISTORY,
        image_s: float | None = None,
    ) -> None:
        """``image_s``: seconds per image on the vision pair's image engines (None: the image
        preset's estimate). ``served_names`` overrides what node n answers to (default:
        ``default_served_names(n)``); ``dev_mode`` is vLLM's ``VLLM_SERVER_DEV_MODE=1``;
        ``capacity`` node n's ``--max-num-seqs`` and time per token (default: no limit, no
        delay; see ``sim.node.capacity``); ``history`` how many requests each node records."""
        if count < 1:
            raise ValueError("count must be >= 1")
        self.count = count
        self.host = host
        names = dict(served_names or {})
        limits = dict(capacity or {})
        self.nodes: dict[int, Node] = {
            n: Node(
                n,
                host,
                base_port + n - 1 if base_port else 0,
                api_key=api_key,
                model=NODE_MODELS.get(n, DEFAULT_MODEL),
                served_names=names.get(n) or default_served_names(n),
                dev_mode=dev_mode,
                capacity=limits.get(n, UNLIMITED),
                history=history,
                capabilities=default_capabilities(n),
                images=default_images(n, image_s),
            )
            for n in range(1, count + 1)
        }
        self._api_key = api_key
        self._served = names  # what reset() restores
        self._spec: WorkerSpec | None = None
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._workers_lock = threading.Lock()
        self._lora_nodes: tuple[int, ...] = ()  # serve_lora's: they report `lora` after reset
        self._tspec: TrainerSpec | None = None
        self._trainers: dict[int, subprocess.Popen[bytes]] = {}
        self._training: set[int] = set()  # engine handed over to the trainer (engine/stop)
        self._control_port = control_port
        self._control: HTTPServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Self:
        """Start the loop thread; returns once every node (and the control API) listens."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                _cancel_all(loop)
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="sim-fleet", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self._call(self._start_all())
        except BaseException:
            self.stop()
            raise
        return self

    async def _start_all(self) -> None:
        for node in self.nodes.values():
            await node.start()
        if self._control_port is not None:
            self._control = HTTPServer(self._control_handle, self.host, self._control_port)
            await self._control.start()

    def stop(self) -> None:
        """Stop the trainers and batch workers, close every socket and join the loop thread
        (idempotent)."""
        self.stop_trainers()
        self.stop_workers()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive() and not loop.is_closed():
            try:
                self._call(self._stop_all(), timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None

    async def _stop_all(self) -> None:
        if self._control is not None:
            await self._control.stop()
        for node in self.nodes.values():
            await node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("fleet is not running; call start() first")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError("blocking Fleet call made from the fleet's own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    # -- queries and controls -----------------------------------------------------------------
    def node(self, n: int) -> Node:
        try:
            return self.nodes[n]
        except KeyError:
            raise ValueError(f"no node {n!r}; nodes are 1..{self.count}") from None

    def url(self, n: int) -> str:
        return self.node(n).url

    def port(self, n: int) -> int:
        return self.node(n).port

    def urls(self) -> dict[int, str]:
        return {n: node.url for n, node in self.nodes.items()}

    @property
    def control_url(self) -> str | None:
        if self._control is None:
            return None
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self._control.port}"

    def set(self, n: int, mode: str, /, **params: Any) -> None:
        """Switch node ``n`` to ``mode`` (see ``sim.node.MODES``) with its parameters."""
        node = self.node(n)
        parse_mode(mode, params)  # validate in the caller's thread for a clean traceback
        self._call(node.set_mode(mode, **params))

    def set_all(self, mode: str, /, **params: Any) -> None:
        for n in self.nodes:
            self.set(n, mode, **params)

    def set_load(self, n: int, load: int) -> None:
        self.node(n).set_load(load)

    def set_capacity(self, n: int, **params: Any) -> None:
        """Node ``n``'s ``max_num_seqs`` (None: no limit) and/or ``token_s`` from now on."""
        node = self.node(n)
        parse_capacity(params)  # validate in the caller's thread for a clean traceback
        self._call(node.set_capacity(**params))

    def set_capabilities(self, n: int, names: Sequence[str]) -> None:
        """What node ``n`` reports it serves (chat, image_input, image_generation)."""
        node = self.node(n)

        async def apply() -> None:
            self._set_capabilities(node, names)

        self._call(apply())

    def set_api_key(self, n: int, api_key: str | None) -> None:
        self.node(n).api_key = api_key

    def set_served_names(self, n: int, names: Sequence[str] | None) -> None:
        """Node ``n`` answers to ``names`` from now on (None: ``default_served_names(n)``)."""
        self.node(n).set_served_names(names or default_served_names(n))

    def served_names(self, n: int) -> tuple[str, ...]:
        return self.node(n).served_names

    def mode(self, n: int) -> str:
        return self.node(n).mode

    def requests(self, n: int) -> list[RecordedRequest]:
        """Snapshot of what reached node ``n`` (the last 1,000 requests), oldest first."""
        return self.node(n).requests()

    def clear_requests(self, n: int | None = None) -> None:
        for node in self.nodes.values() if n is None else [self.node(n)]:
            node.clear_requests()

    def reset(self) -> None:
        """All nodes healthy, load 0, served names and capacity as started, request logs
        cleared, dead batch workers started again."""
        self._call(self._reset())

    async def _reset(self) -> None:
        for n, node in self.nodes.items():
            await node.reset()
            node.set_served_names(self._served.get(n) or default_served_names(n))
            if n in self._lora_nodes:
                self._set_capabilities(node, [*default_capabilities(n), caps.LORA])
            if n in self._training:  # its trainer holds the GPU and brings the engine back
                await node.set_mode("refuse")
        for n in self._spec.nodes if self._spec else ():
            if n not in self._training:
                self._start_worker(n, replace=False)
        for n in self._tspec.nodes if self._tspec else ():
            self._start_trainer(n, replace=False)

    # -- fine-tuning: LoRA serving and trainers -----------------------------------------------
    def serve_lora(
        self,
        gateway_url: str,
        node_secret: str,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """vLLM's LoRA serving on every node whose preset has it (``lora_nodes``): a registry
        with heady_node's real resolver (adapters fetched from ``gateway_url`` with the node's
        credential into ``<cache_dir>/node<n>``; None: a temporary directory), reported as
        the ``lora`` capability. Returns ``{node: base}``."""
        cache = None if cache_dir is None else str(cache_dir)
        return self._call(self._serve_lora_here(gateway_url, node_secret, cache))

    async def _serve_lora_here(
        self, gateway_url: str, node_secret: str, cache_dir: str | None
    ) -> dict[str, Any]:
        batch_worker.check_gateway_url(gateway_url)
        if not node_secret:
            raise ValueError("'node_secret' must be a non-empty string")
        root = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="heady-sim-lora-"))
        nodes = lora_nodes(self.count)
        for n in nodes:
            node = self.nodes[n]
            cred = node_credential(node_secret, n)
            resolver = gateway_resolver(gateway_url, cred, root / f"node{n}")
            node.loras = LoraRegistry(node.model, [resolver])
            self._set_capabilities(node, [*default_capabilities(n), caps.LORA])
        self._lora_nodes = nodes
        return {str(n): self.nodes[n].model for n in nodes}

    def start_trainers(
        self,
        gateway_url: str,
        node_secret: str,
        python: str | os.PathLike[str],
        nodes: Sequence[int] = BATCH_NODES,
        log_dir: str | os.PathLike[str] | None = None,
        **times: float,
    ) -> dict[str, Any]:
        """Run the fine-tuning runner beside each of ``nodes`` (replacing any running; see
        ``TrainerSpec`` for ``times``); needs the control API (the engine hand-over goes
        through it). Returns ``trainers()``."""
        logs = Path(log_dir) if log_dir else None
        spec = TrainerSpec(gateway_url, node_secret, str(python), tuple(nodes), logs, **times)
        return self._use_trainers(spec)

    def _use_trainers(self, spec: TrainerSpec) -> dict[str, Any]:
        batch_worker.check_gateway_url(spec.gateway_url)
        for n in spec.nodes:
            self.node(n)
        if self.control_url is None:
            raise ValueError("trainers need the fleet's control API (control_port)")
        if not os.access(spec.python, os.X_OK):
            raise ValueError(f"no Python at {spec.python!r} (make torch-install)")
        self.stop_trainers()
        if spec.log_dir is None:
            tmp = Path(tempfile.mkdtemp(prefix="heady-sim-trainers-"))
            spec = TrainerSpec(spec.gateway_url, spec.node_secret, spec.python, spec.nodes, tmp,
                               spec.drain_s, spec.poll_s, spec.poll_max_s)  # fmt: skip
        self._tspec = spec
        for n in spec.nodes:
            self._start_trainer(n)
        return self.trainers()

    def _start_trainer(self, n: int, *, replace: bool = True) -> None:
        spec, control = self._tspec, self.control_url
        if spec is None or n not in spec.nodes or control is None:
            return
        assert spec.log_dir is not None
        with self._workers_lock:
            old = self._trainers.get(n)
            if old is not None and old.poll() is None:
                if not replace:
                    return
                _kill_group(old)
            argv = trainer_argv(spec, n, default_served_names(n), control,
                                spec.log_dir / f"train-node{n}")  # fmt: skip
            env = {
                TRAIN_CREDENTIAL_ENV: node_credential(spec.node_secret, n),
                # heady_node and heady_shared from this checkout, whatever the venv.
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",  # the stand-in is built in memory: never the hub
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1",  # a tiny model: threads only contend with the fleet
            }
            self._trainers[n] = launcher.spawn(
                argv, log_path=spec.log_dir / f"trainer-{n}.log", env=env
            )

    def trainers(self) -> dict[str, Any]:
        """Per node with a trainer: its pid, whether it runs, whether its node is handed over
        to it (engine down for training), its log file."""
        spec = self._tspec
        with self._workers_lock:
            return {
                str(n): {
                    "pid": proc.pid,
                    "alive": proc.poll() is None,
                    "training": n in self._training,
                    "log": str(spec.log_dir / f"trainer-{n}.log")
                    if spec and spec.log_dir
                    else None,
                }
                for n, proc in sorted(self._trainers.items())
            }

    def stop_trainers(self) -> None:
        """SIGTERM every trainer (a job in training runs on until the grace ends: its lease
        then expires and the job is resumed from its last checkpoint)."""
        with self._workers_lock:
            procs, self._trainers = list(self._trainers.values()), {}
        for proc in procs:
            launcher.stop(proc, grace=5.0)

    async def _engine_stop(self, node: Node) -> dict[str, Any]:
        """The trainer frees the GPU: the node's batch worker drains (its shards finished and
        committed, or handed back), then the engine stops serving."""
        n = node.number
        self._training.add(n)
        with self._workers_lock:
            proc = self._workers.get(n)
        drained = None
        if proc is not None and proc.poll() is None:
            drain_s = self._tspec.drain_s if self._tspec else 60.0
            drained = await asyncio.to_thread(_drain_worker, proc, drain_s)
            if not drained:
                await asyncio.to_thread(_kill_group, proc)
        await node.set_mode("refuse")
        return {**node.state(), "training": True, "drained": drained}

    async def _engine_start(self, node: Node) -> dict[str, Any]:
        """Training is over: the engine serves again (a fresh vLLM: no adapter loaded yet, the
        resolver's cache on disk kept) and the batch worker starts again."""
        n = node.number
        if n in self._training:
            self._training.discard(n)
            if node.loras is not None:
                node.loras.reset()
            await node.set_mode("healthy")
            self._start_worker(n)
        return {**node.state(), "training": False}

    # -- batch workers (subprocesses, one per node of the spec) -------------------------------
    def start_workers(
        self,
        gateway_url: str,
        node_secret: str,
        nodes: Sequence[int] = BATCH_NODES,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Run ``heady_node.batch_worker`` beside each of ``nodes`` (replacing any running);
        returns ``workers()``."""
        logs = Path(log_dir) if log_dir else None
        return self._use_workers(WorkerSpec(gateway_url, node_secret, tuple(nodes), logs))

    def _use_workers(self, spec: WorkerSpec) -> dict[str, Any]:
        batch_worker.check_gateway_url(spec.gateway_url)
        for n in spec.nodes:
            self.node(n)
        self.stop_workers()
        if spec.log_dir is None:
            spec = WorkerSpec(
                spec.gateway_url,
                spec.node_secret,
                spec.nodes,
                Path(tempfile.mkdtemp(prefix="heady-sim-workers-")),
            )
        self._spec = spec
        for n in spec.nodes:
            self._start_worker(n)
        return self.workers()

    def _worker_concurrency(self, n: int) -> int | None:
        """What a real node's session gives its worker: the engine's --max-num-seqs."""
        return self.node(n).capacity.max_num_seqs

    def _start_worker(self, n: int, *, replace: bool = True) -> None:
        spec = self._spec
        if spec is None or n not in spec.nodes:
            return
        with self._workers_lock:
            old = self._workers.get(n)
            if old is not None and old.poll() is None:
                if not replace:
                    return
                _kill_group(old)
            assert spec.log_dir is not None
            self._workers[n] = batch_worker.start_process(
                spec.gateway_url,
                node_credential(spec.node_secret, n),
                self.url(n),
                n,
                # The sim's engine takes any token when it has no --api-key; the worker wants one.
                engine_token=self._api_key or "sim-no-key",
                log_path=spec.log_dir / f"worker-{n}.log",
                concurrency=self._worker_concurrency(n),
            )

    def workers(self) -> dict[str, Any]:
        """Per node with a worker: its pid, whether it runs, its log file."""
        spec = self._spec
        with self._workers_lock:
            return {
                str(n): {
                    "pid": proc.pid,
                    "alive": proc.poll() is None,
                    "log": str(spec.log_dir / f"worker-{n}.log") if spec and spec.log_dir else None,
                }
                for n, proc in sorted(self._workers.items())
            }

    def stop_workers(self) -> None:
        """SIGTERM every worker (a worker then abandons its shards: their leases expire)."""
        with self._workers_lock:
            procs, self._workers = list(self._workers.values()), {}
        for proc in procs:
            launcher.stop(proc, grace=5.0)

    def kill(self, n: int) -> dict[str, Any]:
        """Node ``n`` and its worker die together: the worker's process group gets SIGKILL (no
        commit, no goodbye: its leases simply stop beating) and the node refuses connections.
        Returns the node's state."""
        return self._call(self._kill(self.node(n)))

    def revive(self, n: int) -> dict[str, Any]:
        """Node ``n`` healthy again and its worker started afresh (same credential)."""
        return self._call(self._revive(self.node(n)))

    async def _kill(self, node: Node) -> dict[str, Any]:
        with self._workers_lock:
            procs = [p.get(node.number) for p in (self._workers, self._trainers)]
        for proc in procs:
            if proc is not None:
                _kill_group(proc)
        self._training.discard(node.number)  # the VM died: nothing is training on it now
        await node.set_mode("refuse")
        return self._with_procs(node)

    async def _revive(self, node: Node) -> dict[str, Any]:
        self._training.discard(node.number)
        if node.loras is not None:
            node.loras.reset()  # a new VM: its vLLM has loaded no adapter yet
        await node.set_mode("healthy")
        self._start_worker(node.number)
        self._start_trainer(node.number)
        return self._with_procs(node)

    def _with_procs(self, node: Node) -> dict[str, Any]:
        out = {**node.state(), "worker": self.workers().get(str(node.number))}
        if self._tspec is not None:
            out["trainer"] = self.trainers().get(str(node.number))
        return out

    def state(self) -> dict[str, Any]:
        return {str(n): node.state() for n, node in self.nodes.items()}

    # -- control API (runs on the loop thread) ------------------------------------------------
    async def _control_handle(self, req: Request, resp: Response) -> None:
        try:
            status, body = await self._control_route(req)
        except ValueError as e:
            status, body = 400, {"error": str(e)}
        resp.send(status, [_JSON], json.dumps(body).encode())

    async def _control_route(self, req: Request) -> tuple[int, Any]:
        method, path = req.method, req.path.rstrip("/") or "/"
        if path == "/health" and method == "GET":
            return 200, {"ok": True}
        if path == "/nodes" and method == "GET":
            return 200, self.state()
        if path == "/reset" and method == "POST":
            await self._reset()
            return 200, self.state()
        if path == "/requests" and method == "DELETE":
            self.clear_requests()
            return 200, {"ok": True}
        if path == "/workers" and method == "GET":
            return 200, self.workers()
        if path == "/workers" and method == "POST":
            return 200, self._use_workers(WorkerSpec.parse(_json_object(req.body)))
        if path == "/trainers" and method == "GET":
            return 200, self.trainers()
        if path == "/trainers" and method == "POST":
            spec = TrainerSpec.parse(_json_object(req.body))
            return 200, await asyncio.to_thread(self._use_trainers, spec)
        if path == "/lora" and method == "POST":
            body = _json_object(req.body)
            url, secret, cache = (
                body.get("gateway_url"),
                body.get("node_secret"),
                body.get("cache_dir"),
            )
            if not isinstance(url, str) or not isinstance(secret, str) or not secret:
                raise ValueError("'gateway_url' and 'node_secret' must be non-empty strings")
            if cache is not None and not isinstance(cache, str):
                raise ValueError("'cache_dir' must be a string")
            return 200, await self._serve_lora_here(url, secret, cache)
        match = _NODE_PATH.match(path)
        if match is None:
            return 404, {"error": f"no route {method} {path}"}
        n = int(match.group(1))
        if n not in self.nodes:
            return 404, {"error": f"no node {n}; nodes are 1..{self.count}"}
        node = self.nodes[n]
        actions = {
            "/kill": self._kill,
            "/revive": self._revive,
            "/engine/stop": self._engine_stop,
            "/engine/start": self._engine_start,
        }
        if match.group(2) in actions:
            if method != "POST":
                return 405, {"error": f"method {method} not allowed on {path}"}
            return 200, await actions[match.group(2)](node)
        if match.group(2):  # /nodes/{n}/requests
            if method == "GET":
                return 200, [r.to_dict() for r in node.requests()]
            if method == "DELETE":
                node.clear_requests()
                return 200, {"ok": True}
        elif method == "GET":
            return 200, node.state()
        elif method == "POST":
            await self._control_set(node, req.body)
            return 200, node.state()
        return 405, {"error": f"method {method} not allowed on {path}"}

    async def _control_set(self, node: Node, raw: bytes) -> None:
        body = _json_object(raw)
        load = body.pop("load", None)
        mode = body.pop("mode", None)
        names = body.pop("served_names", None)
        capacity = {k: body.pop(k) for k in ("max_num_seqs", "token_s") if k in body}
        caps = body.pop("capabilities", None)
        if mode is None and body:
            raise ValueError(f"parameters {sorted(body)} given without a 'mode'")
        if mode is None and load is None and names is None and not capacity and caps is None:
            raise ValueError(
                "expected 'mode', 'load', 'served_names', 'max_num_seqs', 'token_s' and/or "
                "'capabilities'"
            )
        if caps is not None and (
            not isinstance(caps, list) or not all(isinstance(c, str) for c in caps)
        ):
            raise ValueError("'capabilities' must be a list of capability names")
        if mode is not None and not isinstance(mode, str):
            raise ValueError("'mode' must be a string")
        if names is not None and (
            not isinstance(names, list)
            or not names
            or not all(isinstance(x, str) and x for x in names)
        ):
            raise ValueError("'served_names' must be a non-empty list of non-empty strings")
        if mode is not None:
            parse_mode(mode, body)  # validated first: a bad change must not half-apply
        parse_capacity(capacity, node.capacity)
        if load is not None:
            node.set_load(load)
        if capacity:
            await node.set_capacity(**capacity)
        if names is not None:
            node.set_served_names(names)
        if caps is not None:
            self._set_capabilities(node, caps)
        if mode is not None:
            parse_mode(mode, body)
            await node.set_mode(mode, **body)

    def _set_capabilities(self, node: Node, names: Sequence[str]) -> None:
        """What node reports from now on: 'image_generation' keeps (or starts) its image
        engine, leaving it out stops it; the rest is what vLLM serves."""
        images: ImageSim | bool = "image_generation" in names
        if images and node.images is None:
            images = image_sim_for(NODE_GPUS.get(node.number, "t4"))
        node.set_capabilities([c for c in names if c != "image_generation"], images)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ValueError("body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker's process group (launcher.spawn made it a group leader) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


class FleetProcessError(RuntimeError):
    """The fleet process did not start, or its control API refused a change."""


class FleetProcess:
    """``python -m sim.fleet`` in its own process (its own core and GIL), driven over its
    control API: what ``make dev`` and the benchmarks use, and any test that wants the fleet
    out of its own interpreter. ::

        with FleetProcess(api_key="tok") as fleet:
            fleet.set(3, "refuse"); fleet.url(3); fleet.reset()

    The child exits when its stdin closes, so it never outlives the parent even on SIGKILL;
    ``stop()`` closes stdin, waits, then kills on time-out (always, idempotently).
    """

    def __init__(
        self,
        count: int = NODE_COUNT,
        *,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        base_port: int = 0,
        served_names: Mapping[int, Sequence[str]] | None = None,
        dev_mode: bool = False,
        capacity: Mapping[int, Capacity] | None = None,
        history: int | None = None,
        image_s: float | None = None,
        args: Sequence[str] = (),
        start_timeout: float = 30.0,
        cwd: str | os.PathLike[str] | None = None,
        stderr: int | None = None,
        python: str | os.PathLike[str] | None = None,
    ) -> None:
        """``python``: the interpreter that runs the fleet and its batch workers (default this
        one; the simulator needs 3.12: another venv's caller names the project's)."""
        self._argv = [str(python or sys.executable), "-m", "sim.fleet", "--exit-on-stdin-eof"]
        self._argv += ["--control-port", "0", "--count", str(count), "--host", host]
        self._argv += ["--base-port", str(base_port)]
        if api_key is not None:
            self._argv += ["--api-key", api_key]
        for n, names in (served_names or {}).items():
            self._argv += ["--served-model-name", f"{n}={','.join(names)}"]
        if dev_mode:
            self._argv.append("--dev-mode")
        if image_s is not None:
            self._argv += ["--image-s", str(image_s)]
        for n, cap in (capacity or {}).items():
            seqs = "" if cap.max_num_seqs is None else str(cap.max_num_seqs)
            self._argv += ["--capacity", f"{n}={seqs}:{cap.token_s!r}"]
        if history is not None:
            self._argv += ["--history", str(history)]
        self._argv += list(args)
        self._start_timeout = start_timeout
        self._cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parents[1]
        self._stderr = stderr
        self.proc: subprocess.Popen[str] | None = None
        self.urls: dict[int, str] = {}
        self.control_url = ""
        self.call_timeout = 120.0  # engine/stop waits for a batch worker's drain

    def start(self) -> Self:
        if self.proc is not None:
            return self
        env = dict(os.environ)
        # The child imports `sim` (and heady_shared, src/) from this checkout whatever the
        # caller's cwd or venv (the torch venv has no editable install of the project).
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self._cwd), str(self._cwd / "src"), env.get("PYTHONPATH", "")) if p
        )
        self.proc = subprocess.Popen(
            self._argv,
            cwd=self._cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        try:
            info = json.loads(self._ready_line())
            self.urls = {int(n): url for n, url in info["nodes"].items()}
            self.control_url = info["control"]
        except BaseException:
            self.stop()
            raise
        return self

    def _ready_line(self) -> str:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(self._start_timeout):
                raise FleetProcessError(f"sim.fleet printed nothing in {self._start_timeout} s")
        line = proc.stdout.readline()
        if not line:
            raise FleetProcessError(f"sim.fleet exited before listening (code {proc.wait(5)})")
        return line

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.close()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
        finally:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the control API ------------------------------------------------------------------
    @property
    def nodes(self) -> dict[int, str]:
        """Alias of ``urls`` (node number -> base URL)."""
        return self.urls

    def url(self, n: int) -> str:
        try:
            return self.urls[n]
        except KeyError:
            raise ValueError(f"no node {n!r}; nodes are {sorted(self.urls)}") from None

    def set(self, n: int, mode: str, /, **params: Any) -> dict[str, Any]:
        """Switch node ``n`` to ``mode`` (``sim.node.MODES``); returns the node's state."""
        self.url(n)
        return self._call("POST", f"/nodes/{n}", {"mode": mode, **params})

    def set_all(self, mode: str, /, **params: Any) -> None:
        for n in self.urls:
            self.set(n, mode, **params)

    def set_load(self, n: int, load: int) -> dict[str, Any]:
        self.url(n)
        return self._call("POST", f"/nodes/{n}", {"load": load})

    def set_capacity(self, n: int, **params: Any) -> dict[str, Any]:
        """Node ``n``'s ``max_num_seqs`` (None: no limit) and/or ``token_s``; its state."""
        self.url(n)
        return self._call("POST", f"/nodes/{n}", params)

    def set_served_names(self, n: int, names: Sequence[str]) -> dict[str, Any]:
        self.url(n)
        return self._call("POST", f"/nodes/{n}", {"served_names": list(names)})

    def set_capabilities(self, n: int, names: Sequence[str]) -> dict[str, Any]:
        """What node ``n`` reports it serves (chat, image_input, image_generation)."""
        self.url(n)
        return self._call("POST", f"/nodes/{n}", {"capabilities": list(names)})

    def reset(self) -> dict[str, Any]:
        """Every node healthy, load 0, served names and capacity as started, request logs
        cleared."""
        return self._call("POST", "/reset", {})

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/nodes")

    def start_workers(
        self,
        gateway_url: str,
        node_secret: str,
        nodes: Sequence[int] = BATCH_NODES,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """The fleet process runs ``heady_node.batch_worker`` beside each of ``nodes``
        (``Fleet.start_workers``); returns ``workers()``."""
        body = {"gateway_url": gateway_url, "node_secret": node_secret, "nodes": list(nodes)}
        if log_dir is not None:
            body["log_dir"] = str(log_dir)
        return self._call("POST", "/workers", body)

    def workers(self) -> dict[str, Any]:
        return self._call("GET", "/workers")

    def serve_lora(
        self,
        gateway_url: str,
        node_secret: str,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """LoRA serving with the real resolver on the text nodes (``Fleet.serve_lora``);
        returns ``{node: base}``."""
        body = {"gateway_url": gateway_url, "node_secret": node_secret}
        if cache_dir is not None:
            body["cache_dir"] = str(cache_dir)
        return self._call("POST", "/lora", body)

    def start_trainers(
        self,
        gateway_url: str,
        node_secret: str,
        python: str | os.PathLike[str],
        nodes: Sequence[int] = BATCH_NODES,
        log_dir: str | os.PathLike[str] | None = None,
        **times: float,
    ) -> dict[str, Any]:
        """The fleet process runs the fine-tuning runner beside each of ``nodes``
        (``Fleet.start_trainers``); returns ``trainers()``."""
        body: dict[str, Any] = {
            "gateway_url": gateway_url,
            "node_secret": node_secret,
            "python": str(python),
            "nodes": list(nodes),
            **times,
        }
        if log_dir is not None:
            body["log_dir"] = str(log_dir)
        return self._call("POST", "/trainers", body)

    def trainers(self) -> dict[str, Any]:
        return self._call("GET", "/trainers")

    def engine_stop(self, n: int) -> dict[str, Any]:
        """What a trainer asks before training (``POST /nodes/{n}/engine/stop``)."""
        self.url(n)
        return self._call("POST", f"/nodes/{n}/engine/stop", {})

    def engine_start(self, n: int) -> dict[str, Any]:
        self.url(n)
        return self._call("POST", f"/nodes/{n}/engine/start", {})

    def kill(self, n: int) -> dict[str, Any]:
        """Node ``n`` and its batch worker die together (``Fleet.kill``); the node's state."""
        self.url(n)
        return self._call("POST", f"/nodes/{n}/kill", {})

    def revive(self, n: int) -> dict[str, Any]:
        """Node ``n`` healthy and its worker started again (``Fleet.revive``)."""
        self.url(n)
        return self._call("POST", f"/nodes/{n}/revive", {})

    def requests(self, n: int) -> list[dict[str, Any]]:
        """What reached node ``n`` (``RecordedRequest.to_dict()`` each), oldest first."""
        self.url(n)
        return self._call("GET", f"/nodes/{n}/requests")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        if self.proc is None:
            raise FleetProcessError("fleet process is not running; call start() first")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.control_url + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.call_timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            raise FleetProcessError(f"{method} {path}: HTTP {e.code}: {detail}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--base-port", type=int, default=0, help="node n listens on BASE+n-1 (0: OS-chosen)"
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        metavar="N=NAME[,NAME...]",
        help="what node N answers to (repeatable; default: its repo id and role names)",
    )
    parser.add_argument(
        "--dev-mode",
        action="store_true",
        default=os.environ.get("VLLM_SERVER_DEV_MODE", "0") not in ("", "0"),
        help="serve vLLM's dev-mode endpoints too (/sleep, /collective_rpc, ...)",
    )
    parser.add_argument(
        "--capacity",
        action="append",
        default=[],
        metavar="N=[MAX_NUM_SEQS]:TOKEN_S",
        help="node N's running-sequence limit (empty: none) and seconds per token (repeatable)",
    )
    parser.add_argument(
        "--history", type=int, default=HISTORY, help="requests each node records (%(default)s)"
    )
    parser.add_argument(
        "--image-s",
        type=float,
        default=None,
        help="seconds per image on the vision pair (default: the image preset's estimate)",
    )
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when stdin closes (so a dying parent never leaves this process behind)",
    )
    args = parser.parse_args(argv)
    served: dict[int, list[str]] = {}
    for item in args.served_model_name:
        node, sep, names = item.partition("=")
        if not sep or not node.isdigit() or not names:
            parser.error(f"--served-model-name expects N=NAME[,NAME...], got {item!r}")
        served[int(node)] = names.split(",")
    capacity: dict[int, Capacity] = {}
    for item in args.capacity:
        node, sep, spec = item.partition("=")
        seqs, colon, token_s = spec.partition(":")
        try:
            if not sep or not colon or not node.isdigit():
                raise ValueError("expected N=[MAX_NUM_SEQS]:TOKEN_S")
            capacity[int(node)] = parse_capacity(
                {"max_num_seqs": int(seqs) if seqs else None, "token_s": float(token_s)}
            )
        except ValueError as e:
            parser.error(f"--capacity {item!r}: {e}")

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    if args.exit_on_stdin_eof:

        def wait_eof() -> None:
            try:
                while sys.stdin.buffer.read(65536):
                    pass
            except (OSError, ValueError):
                pass
            done.set()

        threading.Thread(target=wait_eof, name="stdin-eof", daemon=True).start()

    fleet = Fleet(
        args.count,
        args.host,
        args.api_key,
        base_port=args.base_port,
        control_port=args.control_port,
        served_names=served,
        dev_mode=args.dev_mode,
        capacity=capacity,
        history=args.history,
        image_s=args.image_s,
    )
    fleet.start()
    try:
        ready = {
            "nodes": {str(n): u for n, u in fleet.urls().items()},
            "control": fleet.control_url,
        }
        print(json.dumps(ready), flush=True)
        while not done.wait(0.5):
            pass
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
