"""The node's fine-tuning runner: leases `train` work from the gateway like a batch shard and
trains it (docs/fine-tuning.md, "Node API"; docs/batch.md "Leases" for the lease mechanics).

One lease, in order:
  1. read the training (and validation) file through the lease and validate it with
     heady_shared.ftlines, token lengths counted with the base's tokenizer and chat template
     against the served context: a bad file is committed as the job's error before any GPU time;
  2. resolve the hyperparameters for this card (hparams.plan) and report them in an event;
  3. free the GPU: drain the node's batch worker, then stop the local vLLM
     (EngineControl.release, HandOver; why stop+restart and not vLLM's sleep mode:
     docs/fine-tuning.md);
  4. train (trainer.train in a thread), heartbeating meanwhile; metrics -> `metrics` events, each
     epoch's checkpoint -> PUT .../checkpoints/<step>; a heartbeat answering `cancel` or 409 stops
     training at the next step;
  5. PUT the final adapter (tar: adapter_config.json + adapter_model.safetensors), commit;
  6. always give the GPU back to serving (EngineControl.restore), whatever happened, then
     start the batch worker again.

A lease that carries `checkpoint` (the job ran before and its node died) resumes from it: the
checkpoint tar is unpacked and training continues at its step.

Who runs it: the node session (heady_node.session) on nodes that may train (the batch role, or
HEADY_TRAIN=1/0), in a thread of its own process (TrainThread) with a RestartEngine over the
session's own engine, so stopping and restarting vLLM for training stays under the session's
eye. `python -m heady_node.finetune.runner` / `heady-node train-worker` runs it alone on a host
whose GPU nothing else uses (NoEngine: there is no engine to free). `make dev` (sim.fleet) runs
it with `--gpu cpu --dev-base --engine-control <fleet>/nodes/<n>` beside the simulated batch pair:
a tiny random stand-in trained under the served base's name (heady_node.finetune.devbase) and
the sim engine taken down and up by the fleet (FleetEngine); never on a real node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from heady_node import launcher
from heady_node.finetune import hparams
from heady_node.finetune.adapter import CONFIG, WEIGHTS, pack_dir
from heady_node.gpu import GPU_CLASSES, GpuClass
from heady_shared import ftlines
from heady_shared.batchlines import split_lines

log = logging.getLogger("heady_node.finetune")

API = "/api/nodes/v1/leases"
TOKEN_HEADER = "x-heady-lease-token"
METRICS_HEADER = "x-heady-checkpoint-metrics"
KIND = "train"
STATE = "state.json"


class LeaseLost(Exception):
    pass


class EngineControl(Protocol):
    async def release(self) -> None: ...  # the GPU is free when this returns
    async def restore(self) -> None: ...  # serving again (or trying to) when this returns


@dataclass
class RestartEngine:
    """Frees the GPU by stopping the engine's process group (heady_node.launcher.stop) and
    starts the same command again afterwards, waiting until /health answers. `proc` is the
    running engine (the node session's `engine_proc`); `argv`/`env` the command it was started
    with (presets.engine_argv / engine_env). `outage_s` is what serving lost: seconds from the
    stop until the engine was healthy again."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    base_url: str
    proc: subprocess.Popen | None = None
    health_timeout_s: float = 1800.0  # a cold start reads the weights again
    outage_s: float | None = None
    closed: bool = False  # the node is shutting down: restore starts nothing any more
    _stopped_at: float | None = None

    async def release(self) -> None:
        if self.proc is not None:
            await asyncio.to_thread(launcher.stop, self.proc)
            self.proc = None
        self._stopped_at = time.monotonic()

    async def restore(self) -> None:
        if self.closed:
            return
        self.proc = launcher.spawn(self.argv, log_path=self.log_path, env=self.env)
        await asyncio.to_thread(
            launcher.wait_healthy, self.base_url, self.proc, log_path=self.log_path,
            timeout=self.health_timeout_s, interval=0.2,
        )  # fmt: skip
        if self._stopped_at is not None:
            self.outage_s = time.monotonic() - self._stopped_at


@dataclass
class HandOver:
    """The GPU handed over in order on a node that also runs batch work: `pause` drains the
    batch worker (its running lines finish on the live engine and are committed, the rest goes
    back to the gateway for the partner node) *before* the engine stops; after the engine's
    restore, `resume` starts the worker again, also when the restore failed: a worker whose
    engine does not answer reports no models, so it gets no shards, only validation work,
    and picks shards up again by itself once the engine answers. `pause` and `resume` block
    (process waits): they run in a thread. `engine` stays single-purpose (RestartEngine)."""

    engine: EngineControl
    pause: Callable[[], object]
    resume: Callable[[], object]

    @property
    def outage_s(self) -> float | None:
        return getattr(self.engine, "outage_s", None)

    async def release(self) -> None:
        await asyncio.to_thread(self.pause)
        try:
            await self.engine.release()
        except BaseException:
            await asyncio.to_thread(self.resume)  # the runner restores nothing after this
            raise

    async def restore(self) -> None:
        try:
            await self.engine.restore()
        finally:
            await asyncio.to_thread(self.resume)


# (plan) -> (model on its device, tokenizer); trainer.load_base + AutoTokenizer on a node.
Loader = Callable[[hparams.TrainPlan], tuple[Any, Any]]
TokenizerLoader = Callable[[str], Any]


def default_tokenizer(repo: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(repo)


def default_loader(plan: hparams.TrainPlan) -> tuple[Any, Any]:
    from heady_node.finetune import trainer

    return trainer.load_base(plan), default_tokenizer(plan.train_repo)


@dataclass
class TrainLease:
    id: str
    token: str
    job_id: str
    model: str  # the served base
    hyperparameters: object
    seed: int
    heartbeat_s: float
    input: str
    validation_input: str | None
    checkpoint: str | None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> TrainLease:
        lid = str(data["id"])
        base = f"{API}/{lid}/"

        def local(key: str) -> str | None:
            v = data.get(key)
            return v if isinstance(v, str) and v.startswith(base) else None  # gateway paths only

        seed, default_seed = data.get("seed"), hparams.seed_for(str(data["job_id"]))
        return cls(
            id=lid,
            token=str(data["token"]),
            job_id=str(data["job_id"]),
            model=str(data["model"]),
            hyperparameters=data.get("hyperparameters"),
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else default_seed,
            heartbeat_s=max(0.05, float(data.get("heartbeat_s") or 30.0)),
            input=local("input") or f"{base}input",
            validation_input=local("validation_input"),
            checkpoint=local("checkpoint"),
        )


def unpack_checkpoint(body: bytes, dest: Path) -> None:
    allowed = {CONFIG, WEIGHTS, STATE}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
        members = tar.getmembers()
        if {m.name for m in members} != allowed or not all(m.isfile() for m in members):
            raise ValueError(f"checkpoint holds {[m.name for m in members]}")
        dest.mkdir(parents=True)
        for m in members:
            src = tar.extractfile(m)
            assert src is not None
            (dest / m.name).write_bytes(src.read())


def metrics_event(m: Mapping[str, Any]) -> dict[str, Any]:
    text = f"Step {m['step']}/{m['total_steps']}: training loss={m['train_loss']:.4f}"
    if "valid_loss" in m:
        text += f", validation loss={m['valid_loss']:.4f}"
    keys = (
        "step",
        "total_steps",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "full_valid_loss",
        "full_valid_mean_token_accuracy",
    )
    data = {k: m[k] for k in keys if k in m}
    return {"level": "info", "type": "metrics", "message": text, "data": data}


def message_event(text: str, level: str = "info") -> dict[str, Any]:
    return {"level": level, "type": "message", "message": text}


@dataclass
class FineTuneRunner:
    gateway_url: str
    credential: str
    engine: EngineControl
    gpu: GpuClass | None  # None: train on the CPU (tests)
    max_model_len: int
    models: Sequence[str] = ()  # what the engine serves (the lease request's `models`)
    loader: Loader = default_loader
    tokenizer_loader: TokenizerLoader = default_tokenizer
    work_dir: Path | None = None
    log_every: int = 10
    poll_s: float = 10.0  # wait between asks that found no work (run's default)
    # What is really trained when it is not plan.train_repo (--dev-base): named in the events.
    stand_in: str | None = None
    poll_max_s: float = 120.0  # ... doubling up to this (main's)
    gw: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.gw = httpx.AsyncClient(
            base_url=self.gateway_url.rstrip("/"),
            headers={"authorization": f"Bearer {self.credential}"},
            timeout=httpx.Timeout(300.0, connect=10.0),
        )

    async def aclose(self) -> None:
        await self.gw.aclose()

    async def ask(self) -> TrainLease | None:
        resp = await self.gw.post(
            API, json={"models": list(self.models), "idle": True, "kinds": [KIND]}
        )
        if resp.status_code == 204:
            return None
        resp.raise_for_status()
        lease = resp.json().get("lease")
        if not isinstance(lease, dict) or lease.get("kind") != KIND:
            return None
        return TrainLease.parse(lease)

    async def step(self) -> str | None:
        lease = await self.ask()
        return None if lease is None else await self.handle(lease)

    async def run(
        self, stop: asyncio.Event, poll_s: float = 10.0, poll_max_s: float = 120.0
    ) -> None:
        """Take train leases one after another until `stop` is set; no work (or a gateway
        that fails) waits poll_s, doubling up to poll_max_s. A job always runs to its end
        (or its cancel/lost lease): `stop` is looked at between jobs."""
        quiet = 0
        while not stop.is_set():
            try:
                outcome = await self.step()
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                log.warning("train lease round failed: %s", exc)
                outcome = None
            if outcome is not None:
                log.info("train job: %s", outcome)
                quiet = 0
                continue
            delay = min(poll_max_s, poll_s * 2**quiet)
            quiet += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    # -- one lease ---------------------------------------------------------------------------
    async def handle(self, lease: TrainLease) -> str:
        stop = {"cancel": False, "lost": False}
        beat = asyncio.create_task(self._heartbeat(lease, stop))
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
                return await self._run(lease, stop, Path(tmp))
        except LeaseLost:
            return "lease lost: nothing committed"
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _run(self, lease: TrainLease, stop: dict[str, bool], tmp: Path) -> str:
        await self._events(lease, [message_event("Validating training file")])
        tokenizer = await asyncio.to_thread(self.tokenizer_loader, hparams.train_repo(lease.model))
        try:
            requested = hparams.parse_requested(lease.hyperparameters)
        except hparams.HyperparameterError as exc:
            err = {"code": "invalid_hyperparameters", "message": str(exc), "param": exc.param}
            return await self._fail(lease, err)
        files = [("training_file", lease.input)]
        if lease.validation_input:
            files.append(("validation_file", lease.validation_input))
        parsed: dict[str, list[dict[str, Any]]] = {}
        longest = 0
        for param, url in files:
            raw = await self._get(lease, url)
            lines = list(split_lines([raw]))
            lengths: list[int] = []

            def count(ex: Mapping[str, Any], _l: list[int] = lengths) -> int:
                from heady_node.finetune.trainer import token_count

                _l.append(token_count(tokenizer, ex))
                return _l[-1]

            verdict = ftlines.validate_file(
                lines,
                count_tokens=count,
                max_tokens=self.max_model_len,
                param=param,
                min_examples=ftlines.MIN_EXAMPLES if param == "training_file" else 1,
            )
            if not verdict.ok:
                return await self._fail(lease, verdict.job_error() or {})
            parsed[param] = ftlines.parse_examples(lines)
            longest = max([longest, *lengths])
        train_set = parsed["training_file"]
        plan = hparams.plan(
            requested,
            served_base=lease.model,
            n_examples=len(train_set),
            max_length=self.max_model_len,
            seq_tokens=longest,
            seed=lease.seed,
            gpu=self.gpu,
        )
        resume = None
        if lease.checkpoint:
            resume = tmp / "resume" / "ckpt"
            unpack_checkpoint(await self._get(lease, lease.checkpoint), resume)
        steps = hparams.total_steps(plan, len(train_set))
        trained = self.stand_in or plan.train_repo
        await self._events(lease, [message_event(
            f"Files validated: {len(train_set)} examples; training {trained} "
            f"(served as {plan.served_base}) for {plan.epochs} epochs, batch {plan.batch_size} "
            f"({plan.micro_batch} x {plan.grad_accum}), lr {plan.learning_rate:.2e}, "
            f"{plan.precision}{', 4-bit QLoRA' if plan.load_in_4bit else ''}, {steps} steps"
            + (" (resuming from a checkpoint)" if resume else "")
        )])  # fmt: skip
        await self.engine.release()
        try:
            return await self._train(lease, plan, train_set, parsed, resume, stop, tmp)
        except (LeaseLost, httpx.HTTPError):
            raise  # not the job's fault: its lease expires and it runs again
        except Exception as exc:  # the job cannot train (OOM, a bad checkpoint, ...): say so
            log.exception("train job %s failed", lease.job_id)
            why = f"{type(exc).__name__}: {str(exc)[:300]}" if str(exc) else type(exc).__name__
            err = {"code": "training_failed", "message": f"Training failed: {why}", "param": None}
            return await self._fail(lease, err)
        finally:
            await self.engine.restore()
            outage = getattr(self.engine, "outage_s", None)
            if outage is not None:
                log.info("engine serving again after %.1fs without it", outage)

    async def _train(
        self,
        lease: TrainLease,
        plan: hparams.TrainPlan,
        train_set: list[dict[str, Any]],
        parsed: dict[str, list[dict[str, Any]]],
        resume: Path | None,
        stop: dict[str, bool],
        tmp: Path,
    ) -> str:
        from heady_node.finetune import trainer

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Callable[[], Any] | None] = asyncio.Queue()

        async def send_in_order() -> None:  # events and checkpoints leave in training order
            while (job := await queue.get()) is not None:
                if not stop["lost"]:
                    try:
                        await job()
                    except LeaseLost:
                        stop["lost"] = True  # the training thread stops at its next step

        sender = asyncio.create_task(send_in_order())

        def later(job: Callable[[], Any]) -> None:  # called from the training thread
            loop.call_soon_threadsafe(queue.put_nowait, job)

        def on_checkpoint(step: int, d: Path, m: Mapping[str, Any]) -> None:
            later(lambda: self._checkpoint(lease, step, d, m))

        cb = trainer.Callbacks(
            on_metrics=lambda m: later(lambda: self._events(lease, [metrics_event(m)])),
            on_checkpoint=on_checkpoint,
            should_stop=lambda: stop["cancel"] or stop["lost"],
        )
        await self._events(lease, [message_event("Training started")])
        try:
            model, tokenizer = await asyncio.to_thread(self.loader, plan)
            result = await asyncio.to_thread(
                trainer.train, model, tokenizer, train_set, plan, tmp / "run",
                validation=parsed.get("validation_file", ()), callbacks=cb,
                resume_from=resume, log_every=self.log_every,
            )  # fmt: skip
        finally:
            queue.put_nowait(None)
            await sender  # a 409 on an upload rises here as LeaseLost
        if stop["lost"]:
            raise LeaseLost
        if stop["cancel"] or result.adapter_dir is None:
            await self._commit(lease, {"ok": False, "cancelled": True, "steps": result.steps})
            return f"cancelled at step {result.steps}"
        await self._put(lease, f"{API}/{lease.id}/adapter", pack_dir(result.adapter_dir,
                        (CONFIG, WEIGHTS)))  # fmt: skip
        await self._commit(lease, {
            "ok": True, "steps": result.steps, "trained_tokens": result.trained_tokens,
            "hyperparameters": plan.reported(), "seed": plan.seed,
        })  # fmt: skip
        return f"succeeded: {result.steps} steps, {result.trained_tokens} tokens"

    # -- gateway calls -----------------------------------------------------------------------
    async def _heartbeat(self, lease: TrainLease, stop: dict[str, bool]) -> None:
        while True:
            await asyncio.sleep(lease.heartbeat_s)
            try:
                resp = await self.gw.post(
                    f"{API}/{lease.id}/heartbeat", json={"token": lease.token}
                )
            except httpx.HTTPError:
                continue
            if resp.status_code == 409:
                stop["lost"] = True
                return
            with contextlib.suppress(ValueError):
                if resp.status_code == 200 and resp.json().get("cancel") is True:
                    stop["cancel"] = True

    async def _get(self, lease: TrainLease, url: str) -> bytes:
        resp = await self.gw.get(url, headers={TOKEN_HEADER: lease.token})
        self._check(resp)
        return resp.content

    async def _put(
        self, lease: TrainLease, url: str, body: bytes, headers: Mapping[str, str] = {}
    ) -> None:
        hdrs = {TOKEN_HEADER: lease.token, "content-type": "application/x-tar", **headers}
        self._check(await self.gw.put(url, content=body, headers=hdrs))

    async def _events(self, lease: TrainLease, events: list[dict[str, Any]]) -> None:
        resp = await self.gw.post(
            f"{API}/{lease.id}/events", json={"token": lease.token, "events": events}
        )
        self._check(resp)

    async def _checkpoint(
        self, lease: TrainLease, step: int, d: Path, m: Mapping[str, Any]
    ) -> None:
        body = pack_dir(d, (CONFIG, WEIGHTS, STATE))
        data = {k: v for k, v in metrics_event(m)["data"].items() if k != "total_steps"}
        await self._put(lease, f"{API}/{lease.id}/checkpoints/{step}", body,
                        {METRICS_HEADER: json.dumps(data)})  # fmt: skip

    async def _commit(self, lease: TrainLease, body: dict[str, Any]) -> None:
        resp = await self.gw.post(f"{API}/{lease.id}/commit", json={"token": lease.token, **body})
        self._check(resp)

    async def _fail(self, lease: TrainLease, error: Mapping[str, Any]) -> str:
        await self._events(lease, [message_event(str(error.get("message")), "error")])
        await self._commit(lease, {"ok": False, "error": dict(error)})
        return f"failed: {error.get('message')}"

    @staticmethod
    def _check(resp: httpx.Response) -> None:
        if resp.status_code == 409:
            raise LeaseLost
        if resp.status_code != 200:
            raise RuntimeError(f"gateway answered HTTP {resp.status_code} on {resp.request.url}")


# -- who trains, and the process / thread around the runner -----------------------------------
TRAIN_ENV = "HEADY_TRAIN"
CREDENTIAL_ENV = "HEADY_NODE_CREDENTIAL"  # = heady_node.batch_worker's (tested)
GATEWAY_ENV = "HEADY_GATEWAY_URL"
_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def may_train(role: str, setting: str = "") -> bool:
    """HEADY_TRAIN=1/0 decides; unset (or unreadable), the batch pair trains."""
    s = setting.strip().lower()
    if s in _YES or s in _NO:
        return s in _YES
    return role == "batch"


class NoEngine:
    """Nothing serves on this host's GPU: there is nothing to free or give back."""

    async def release(self) -> None:
        return None

    async def restore(self) -> None:
        return None


class FleetEngine:
    """SIMULATED CLUSTER ONLY (`make dev`, sim.fleet): the engine hand-over asked of the fleet's
    control API for this node (`<control>/nodes/<n>`). release: the fleet drains the node's
    batch worker, then takes its simulated engine down (it refuses connections, as a stopped
    vLLM behind its tunnel); restore: engine up, worker started again. A real node stops and
    restarts vLLM itself (RestartEngine)."""

    def __init__(self, node_url: str, timeout_s: float = 300.0) -> None:
        self.node_url = node_url.rstrip("/")
        self.timeout_s = timeout_s  # the fleet waits for the worker's drain before answering
        self.outage_s: float | None = None
        self._stopped_at: float | None = None

    async def _post(self, action: str) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s) as c:
            resp = await c.post(f"{self.node_url}/engine/{action}", json={})
        if resp.status_code != 200:
            raise RuntimeError(f"fleet answered HTTP {resp.status_code} to engine/{action}")

    async def release(self) -> None:
        await self._post("stop")
        self._stopped_at = time.monotonic()

    async def restore(self) -> None:
        await self._post("start")
        if self._stopped_at is not None:
            self.outage_s = time.monotonic() - self._stopped_at


class TrainThread:
    """The runner's loop in a thread of the node session's process: the session's keep-alive
    loop stays in charge; `stop` lets a running job reach its end only within `timeout`."""

    def __init__(self, runner: FineTuneRunner) -> None:
        self.runner = runner
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self.thread = threading.Thread(target=self._main, name="heady-train", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        async def run() -> None:
            try:
                await self.runner.run(self._stop, poll_s=self.runner.poll_s)
            finally:
                await self.runner.aclose()

        self._loop.run_until_complete(run())
        self._loop.close()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop just closed
                self._loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(timeout)


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="heady-node train-worker",
        description="Lease fine-tuning jobs from the gateway and train them on this host's GPU, "
        "which nothing else may use (`heady-node serve` runs training itself on nodes that "
        f"train). Secret from the environment: {CREDENTIAL_ENV} (this node's gateway "
        "credential).",
    )
    p.add_argument("--gateway", default=env.get(GATEWAY_ENV), help=f"default ${GATEWAY_ENV}")
    p.add_argument(
        "--model", action="append", default=[], required=True,
        help="a served base this host trains for (repeatable): the lease request's models",
    )  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=16384, help="the served context")
    p.add_argument(
        "--gpu", choices=[*GPU_CLASSES, "cpu"], default="cpu",
        help="the card's class (heady_node.gpu); cpu trains on the CPU (tests, tiny models)",
    )  # fmt: skip
    p.add_argument("--work-dir", type=Path, default=None, help="scratch space for a job")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between empty asks")
    p.add_argument(
        "--poll-max", type=float, default=120.0,
        help="the longest wait between empty asks (the wait doubles from --poll up to it)",
    )  # fmt: skip
    # The simulated cluster's trainer (make dev: sim.fleet starts it beside nodes 7-8).
    p.add_argument(
        "--dev-base", action="store_true",
        help="SIMULATED CLUSTER ONLY, never on a real node: train a tiny random stand-in "
        "(heady_node.finetune.devbase) under the served base's name; needs --gpu cpu",
    )  # fmt: skip
    p.add_argument(
        "--engine-control", default=None, metavar="URL",
        help="SIMULATED CLUSTER ONLY: the fleet's control API for this node "
        "(http://host:port/nodes/N), asked to take the node's engine down and up around "
        "each job (FleetEngine); default: no engine to free",
    )  # fmt: skip
    return p


def build(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> FineTuneRunner:
    """The runner the command line and environment describe; SystemExit(2) with the reasons
    when the gateway, its URL's scheme or the credential is wrong or missing."""
    from heady_node.batch_worker import check_gateway_url

    env = os.environ if env is None else env
    parser = _parser(env)
    args = parser.parse_args(argv)
    credential = env.get(CREDENTIAL_ENV, "").strip()
    problems = [
        *([] if args.gateway else [f"--gateway (or ${GATEWAY_ENV}) is required"]),
        *([] if credential else [f"${CREDENTIAL_ENV} is not set"]),
        *([] if args.max_model_len > 0 else ["--max-model-len must be positive"]),
        *(["--dev-base trains on the CPU only: give --gpu cpu"]
          if args.dev_base and args.gpu != "cpu" else []),
    ]  # fmt: skip
    gateway = args.gateway or ""
    try:
        if args.gateway:
            gateway = check_gateway_url(args.gateway)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        parser.error("; ".join(problems))
    dev: dict[str, Any] = {}
    if args.dev_base:
        from heady_node.finetune import devbase

        dev = {
            "loader": devbase.load,
            "tokenizer_loader": devbase.load_tokenizer,
            "stand_in": "the dev cluster's tiny random stand-in (heady_node.finetune.devbase)",
        }
    return FineTuneRunner(
        gateway_url=gateway,
        credential=credential,
        engine=FleetEngine(args.engine_control) if args.engine_control else NoEngine(),
        gpu=None if args.gpu == "cpu" else GPU_CLASSES[args.gpu],
        max_model_len=args.max_model_len,
        models=tuple(args.model),
        work_dir=args.work_dir,
        poll_s=args.poll,
        poll_max_s=max(args.poll, args.poll_max),
        **dev,
    )


def main(argv: Sequence[str] | None = None) -> int:
    runner = build(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s train-worker: %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from heady_node.finetune import devbase

    if runner.loader is devbase.load:  # --dev-base: its imports now, not inside the first job
        threading.Thread(target=devbase.warm, name="dev-base-warm", daemon=True).start()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("leasing train jobs from %s for %s", runner.gateway_url, ", ".join(runner.models))
        try:
            await runner.run(stop, poll_s=runner.poll_s, poll_max_s=runner.poll_max_s)
        finally:
            await runner.aclose()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
