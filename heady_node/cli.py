"""`heady-node`: run a Heady node on any Linux GPU host (the notebook calls the same code).

    heady-node install --tunnel cloudflare      # driver/CUDA check, then vLLM + the tunnel agent
    heady-node serve --node 3                   # GPU -> preset -> vLLM + guard -> tunnel -> status
    heady-node batch-worker --gateway URL       # pull batch work (serve starts it by itself when
                                                # HEADY_GATEWAY_URL + HEADY_NODE_CREDENTIAL are set)
    heady-node train-worker --model M --gpu t4  # lease fine-tuning jobs on a GPU nothing else
                                                # uses (serve trains by itself on training nodes)

Settings come from flags or the environment (HEADY_NODE, HEADY_TUNNEL, HEADY_MODEL, HEADY_PORT,
HEADY_MEDIA_DOMAINS, HEADY_ROUTES, HEADY_DRY_RUN, HEADY_IMAGES=0, HEADY_IMAGE_MODEL); secrets
(NODE_TOKEN, CF_TUNNEL_TOKEN_<n>, ...) from Colab's Secrets panel when in Colab, the environment
otherwise. Exit codes: 0 stopped cleanly, 1 the engine failed, 2 bad settings or a host that
cannot run vLLM (one `heady-node: error:` line).
"""

import argparse
import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path

from heady_node import batch_worker, install, launcher, presets, settings, tunnel
from heady_node import gpu as gpu_mod
from heady_node.session import DRY_RUN_GPU, NodeSession

EXIT_OK, EXIT_ENGINE, EXIT_SETTINGS = 0, 1, 2
SETTINGS_ERRORS = (
    gpu_mod.GpuError,
    presets.PresetError,
    settings.SettingsError,
    tunnel.TunnelError,
    install.InstallError,
    ValueError,
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="heady-node", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start vLLM, the guard and the tunnel; print status")
    serve.add_argument("--node", type=int, default=int(env("HEADY_NODE", "0") or 0))
    serve.add_argument(
        "--tunnel", choices=settings.TUNNEL_KINDS, default=env("HEADY_TUNNEL", "cloudflare")
    )
    serve.add_argument("--model", default=env("HEADY_MODEL") or None)
    serve.add_argument("--port", type=int, default=int(env("HEADY_PORT", "8000")))
    serve.add_argument(
        "--media-domain",
        action="append",
        default=env("HEADY_MEDIA_DOMAINS", "").replace(",", " ").split(),
        help="vision: a host image URLs may be fetched from (repeatable; default none)",
    )
    serve.add_argument("--ngrok-api", default=env("HEADY_NGROK_API", tunnel.NGROK_API))
    serve.add_argument(
        "--routes",
        default=env("HEADY_ROUTES") or None,
        help="the gateway's ROUTES JSON, if not the default: decides role and model names",
    )
    serve.add_argument("--log-dir", type=Path, default=Path(env("HEADY_LOG_DIR", "/tmp/heady")))
    serve.add_argument("--status-interval", type=float, default=60.0)
    serve.add_argument("--rounds", type=int, default=None, help="stop after N status lines")
    serve.add_argument("--engine", default=None, help="command replacing `vllm serve`")
    serve.add_argument(
        "--no-images",
        action="store_true",
        default=env("HEADY_IMAGES", "1").strip().lower() in ("0", "false", "no"),
        help="vision nodes: serve chat only, no image engine next to vLLM",
    )
    serve.add_argument(
        "--image-model", default=env("HEADY_IMAGE_MODEL") or None, help="image checkpoint"
    )
    serve.add_argument("--dry-run", action="store_true", default=_env_flag("HEADY_DRY_RUN"))

    # Its own flags and --help: heady_node.batch_worker (dispatched in main before parsing).
    sub.add_parser("batch-worker", help="pull batch work from the gateway (beside serve)")
    # Its own flags: heady_node.finetune.runner (serve trains by itself on training nodes).
    sub.add_parser("train-worker", help="lease fine-tuning jobs on a GPU nothing else uses")

    inst = sub.add_parser("install", help="check driver/CUDA, then install vLLM and the agent")
    inst.add_argument(
        "--tunnel", choices=settings.TUNNEL_KINDS, default=env("HEADY_TUNNEL", "cloudflare")
    )
    inst.add_argument("--bin-dir", default="/usr/local/bin")
    inst.add_argument(
        "--dry-run",
        action="store_true",
        default=_env_flag("HEADY_DRY_RUN"),
        help="stand-in GPU, print the commands without running them",
    )
    return parser


def cmd_install(args: argparse.Namespace) -> int:
    if args.dry_run:
        report = install.inspect_host(lambda argv: DRY_RUN_GPU + "| CUDA Version: 12.4 |\n")
    else:
        report = install.inspect_host()
    for line in report.lines():
        print(line, flush=True)
    cmds = install.install_commands(args.tunnel, bin_dir=args.bin_dir)
    install.run_commands(cmds, execute=not args.dry_run, out=lambda s: print(s, flush=True))
    return EXIT_OK


def _interrupt(signum: int, frame: object) -> None:
    """A service manager's SIGTERM stops the node like Ctrl+C: engine and tunnel go with it."""
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    node = NodeSession(
        node=args.node,
        model=args.model,
        tunnel_kind=args.tunnel,
        dry_run=args.dry_run,
        port=args.port,
        media_domains=tuple(args.media_domain),
        ngrok_api=args.ngrok_api,
        routes=args.routes,
        status_interval=args.status_interval,
        log_dir=args.log_dir,
        engine=shlex.split(args.engine) if args.engine else None,
        images=not args.no_images,
        image_model=args.image_model,
        out=lambda s: print(s, flush=True),
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        node.preflight()
        try:
            node.start_engine()
        except launcher.EngineError as exc:
            print(f"heady-node: engine failed: {exc}", file=sys.stderr, flush=True)
            return EXIT_ENGINE
        # A tunnel failure is reported; the engine keeps serving and keep_alive retries it.
        with contextlib.suppress(tunnel.TunnelError):
            node.open_tunnel()
        node.keep_alive(rounds=args.rounds, retry_tunnel=True)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()  # whatever happened above (a closed stdout too), no process is left behind
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["batch-worker"]:
        return batch_worker.main(argv[1:])
    if argv[:1] == ["train-worker"]:
        from heady_node.finetune import runner  # httpx only; torch is imported per job

        return runner.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "install":
            return cmd_install(args)
        return cmd_serve(args)
    except SETTINGS_ERRORS as exc:
        print(f"heady-node: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_SETTINGS


if __name__ == "__main__":
    raise SystemExit(main())
