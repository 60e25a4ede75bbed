"""vLLM LoRA resolver plugin: serve `ft:` models by fetching their adapter from the gateway.

vLLM asks its registered LoRA resolvers when a request names a model that is neither a served
base name nor a loaded adapter (`_check_model` in vLLM's OpenAI serving layer, only when
VLLM_ALLOW_RUNTIME_LORA_UPDATING is true: research node-apis.md §3.3); the first resolver to
return a LoRARequest wins, vLLM loads it and later requests find it loaded; if none does, the
request gets 404 "The model `X` does not exist.".

Modelled on vLLM's own filesystem resolver (vllm/plugins/lora_resolvers/filesystem_resolver.py
@03c45fd8: the LoRARequest from a directory whose adapter_config.json names LORA and the exact
base) and the interface in vllm/lora/resolver.py @f011f1c3 (`LoRAResolver.resolve_lora(
base_model_name, lora_name)`, `LoRAResolverRegistry.register_resolver(name, resolver)`). Ours
differs where the filesystem one cannot serve us: `ft:` names contain `/` and `:`, so the cache
directory is a safe slug of the name (heady_shared.ftnames.slug), never the name joined
to a path; and a miss fetches the adapter from the gateway before answering.

    GET <gateway>/api/nodes/v1/adapters/<slug>      Authorization: Bearer <node credential>
      200 application/x-tar: adapter_config.json + adapter_model.safetensors
      404 not a fine-tuned model the gateway knows (or not of this base)

The tar is unpacked into `<cache>/.part-<slug>-<random>/`, checked (only those two regular
files; check_vllm_compatible against the served base) and renamed to `<cache>/<slug>/` in one
step, so vLLM never sees a half-written adapter and two concurrent misses cannot mix files.
Adapters are immutable (a name is one job's result, or one step of it for a checkpoint
`...:ckpt-step-<n>`, whose slug is `ft-ckpt-<job>-<n>-<digest>`: the gateway serves its adapter
files cut from the checkpoint tar, never the trainer's state.json), so a cached directory is
reused as is.

Installed as a `vllm.general_plugins` entry point (pyproject.toml): vLLM calls `register()` in
each of its processes; without HEADY_GATEWAY_URL, HEADY_NODE_CREDENTIAL and HEADY_LORA_CACHE_DIR
it registers nothing. vLLM is imported only inside `register()`/`resolver()`, so everything else
here runs (and is tested) without vLLM.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import secrets
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heady_node.finetune.adapter import CONFIG, WEIGHTS, check_vllm_compatible
from heady_shared import ftnames

log = logging.getLogger("heady_node.lora_resolver")

GATEWAY_ENV = "HEADY_GATEWAY_URL"
CREDENTIAL_ENV = "HEADY_NODE_CREDENTIAL"
CACHE_ENV = "HEADY_LORA_CACHE_DIR"
ADAPTERS_API = "/api/nodes/v1/adapters"
ADAPTER_FILES = frozenset({CONFIG, WEIGHTS})
MAX_ADAPTER_BYTES = 2 * 1024**3  # a rank-16 adapter of a 32B model is ~0.3 GB
RESOLVER_NAME = "heady_gateway_resolver"

# (url, headers) -> (status, body); urllib by default, a fake gateway's client in tests.
Fetch = Callable[[str, dict[str, str]], tuple[int, bytes]]


class FetchError(RuntimeError):
    pass


def urllib_fetch(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            body = resp.read(MAX_ADAPTER_BYTES + 1)
            return resp.status, body
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def lora_int_id(name: str) -> int:
    """vLLM's integer id for an adapter: stable across processes (hash() is not)."""
    return 1 + int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % (2**31 - 2)


def unpack(tar_bytes: bytes, dest: Path) -> None:
    """Unpack an adapter tar: exactly the adapter files, regular files, plain names."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        if sorted(names) != sorted(ADAPTER_FILES) or not all(m.isfile() for m in members):
            raise FetchError(f"adapter archive holds {names}, expected {sorted(ADAPTER_FILES)}")
        dest.mkdir(parents=True)
        for m in members:
            src = tar.extractfile(m)
            assert src is not None
            with (dest / m.name).open("wb") as out:
                shutil.copyfileobj(src, out)


@dataclass
class AdapterCache:
    """The resolver's logic without vLLM: name -> adapter directory (fetching on a miss)."""

    cache_dir: Path
    gateway_url: str
    credential: str
    fetch: Fetch = urllib_fetch

    def path_for(self, name: str) -> Path | None:
        # The gateway asks vLLM for an `ft:` model by its slug (heady_shared.ftnames.slug,
        # the name of its GET .../adapters/<slug>): used as it is.
        if ftnames.is_slug(name):
            return self.cache_dir / name
        return None if ftnames.ft_base(name) is None else self.cache_dir / ftnames.slug(name)

    def get(self, base_model_name: str, lora_name: str) -> Path | None:
        """The adapter directory for `lora_name` on a node serving `base_model_name`, fetched
        if needed; None when it is not ours to serve (vLLM then answers 404)."""
        path = self.path_for(lora_name)
        if path is None:
            return None
        if not (path / CONFIG).is_file():
            url = f"{self.gateway_url.rstrip('/')}{ADAPTERS_API}/{path.name}"
            status, body = self.fetch(url, {"authorization": f"Bearer {self.credential}"})
            if status == 404:
                return None
            if status != 200:
                raise FetchError(f"gateway answered HTTP {status} for adapter {path.name}")
            if len(body) > MAX_ADAPTER_BYTES:
                raise FetchError(f"adapter {path.name} is larger than {MAX_ADAPTER_BYTES} bytes")
            part = self.cache_dir / f".part-{path.name}-{secrets.token_hex(4)}"
            try:
                unpack(body, part)
                problems = check_vllm_compatible(part, base_model_name)
                if problems:
                    raise FetchError(f"adapter {path.name}: " + "; ".join(problems))
                try:
                    part.rename(path)
                except OSError:
                    if not (path / CONFIG).is_file():  # not a concurrent twin's win
                        raise
            finally:
                shutil.rmtree(part, ignore_errors=True)
        problems = check_vllm_compatible(path, base_model_name)
        if problems:
            log.warning("cached adapter %s not loadable here: %s", path.name, problems)
            return None
        return path


def resolver(cache: AdapterCache) -> Any:
    """A vllm.lora.resolver.LoRAResolver over `cache` (imports vLLM)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class HeadyGatewayResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            if ftnames.ft_base(lora_name) is None and not ftnames.is_slug(lora_name):
                return None  # not a fine-tuned model name: not ours
            try:
                path = await asyncio.to_thread(cache.get, base_model_name, lora_name)
            except (FetchError, OSError, tarfile.TarError) as exc:
                log.warning("adapter for %s not fetched: %s", lora_name, exc)
                return None
            if path is None:
                return None
            return LoRARequest(
                lora_name=lora_name, lora_int_id=lora_int_id(lora_name), lora_path=str(path)
            )

    return HeadyGatewayResolver()


def cache_from_env(env: dict[str, str] | None = None) -> AdapterCache | None:
    env = dict(os.environ) if env is None else env
    gateway, credential = env.get(GATEWAY_ENV, ""), env.get(CREDENTIAL_ENV, "")
    cache_dir = env.get(CACHE_ENV, "")
    if not (gateway and credential and cache_dir):
        return None
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    return AdapterCache(path, gateway, credential)


def register() -> None:
    """The `vllm.general_plugins` entry point."""
    cache = cache_from_env()
    if cache is None:
        log.info("heady LoRA resolver not configured (%s, %s, %s)", GATEWAY_ENV,
                 CREDENTIAL_ENV, CACHE_ENV)  # fmt: skip
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver(cache))
