"""``python -m sim.node``: one simulated node standing in for ``vllm serve``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile

from sim.node.capacity import parse_capacity
from sim.node.images import image_sim_for
from sim.node.lifecycle import DEFAULT_MODEL, Node
from sim.node.lora import LoraRegistry, gateway_resolver, static_resolver

__all__ = ["main"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sim.node",
        description="One simulated vLLM node; unknown vLLM flags are accepted and ignored.",
    )
    parser.add_argument("positional", nargs="*", help="[serve] [MODEL], as with `vllm serve`")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--node", type=int, default=1, help="node number reported in answers")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="vLLM's limit of running sequences; more requests wait (default: no limit)",
    )
    parser.add_argument(
        "--sim-token-s",
        type=float,
        default=0.0,
        help="simulator only: seconds per generated token of one sequence (default 0)",
    )
    parser.add_argument(
        "--sim-images",
        default=None,
        metavar="GPU",
        help="simulator only: run the image engine of this GPU class's preset (t4, l4, ...)",
    )
    parser.add_argument(
        "--sim-image-s",
        type=float,
        default=None,
        help="simulator only: seconds per image (default: the image preset's estimate)",
    )
    # LoRA (vLLM's --enable-lora; resolvers run only with VLLM_ALLOW_RUNTIME_LORA_UPDATING).
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument(
        "--sim-lora-resolve",
        nargs="+",
        default=(),
        metavar="NAME",
        help="simulator only: adapter names a resolver finds (loaded on first use)",
    )
    parser.add_argument(
        "--sim-lora-gateway",
        default=None,
        metavar="URL",
        help="simulator only: resolve ft: names through the gateway as heady_node's LoRA "
        "resolver does (credential from HEADY_NODE_CREDENTIAL, cache dir HEADY_LORA_CACHE_DIR)",
    )
    args, _unknown = parser.parse_known_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    positional = list(args.positional)
    if positional and positional[0] == "serve":
        positional.pop(0)
    model = args.model or (positional[0] if positional else None) or DEFAULT_MODEL
    # vLLM reads VLLM_API_KEY when --api-key is absent, and VLLM_SERVER_DEV_MODE=1 adds routes.
    api_key = args.api_key or os.environ.get("VLLM_API_KEY") or None
    dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE", "0") not in ("", "0")

    try:
        capacity = parse_capacity({"max_num_seqs": args.max_num_seqs, "token_s": args.sim_token_s})
    except ValueError as e:
        print(f"python -m sim.node: {e}", file=sys.stderr)
        return 2

    loras = None
    if args.enable_lora:
        loras = LoraRegistry(
            model,
            runtime_updating=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower()
            in ("1", "true"),
        )
        if args.sim_lora_resolve:
            loras.resolvers.append(static_resolver(args.sim_lora_resolve))
        if args.sim_lora_gateway:
            cache = os.environ.get("HEADY_LORA_CACHE_DIR") or tempfile.mkdtemp(prefix="sim-lora-")
            credential = os.environ.get("HEADY_NODE_CREDENTIAL", "")
            loras.resolvers.append(gateway_resolver(args.sim_lora_gateway, credential, cache))

    async def run() -> None:
        node = Node(
            args.node,
            args.host,
            args.port,
            api_key=api_key,
            model=model,
            served_names=args.served_model_name,
            dev_mode=dev_mode,
            capacity=capacity,
            images=image_sim_for(args.sim_images, args.sim_image_s) if args.sim_images else None,
            loras=loras,
        )
        await node.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Same wording as vLLM/uvicorn so launchers waiting for this line work unchanged.
        print(
            f"INFO:     Uvicorn running on http://{args.host}:{node.port} (Press CTRL+C to quit)",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        await node.stop()

    asyncio.run(run())
    return 0
