"""vLLM's LoRA serving semantics, as far as the gateway can observe them.

What vLLM does (vllm-project/vllm, vllm/entrypoints/openai/engine/serving.py `_check_model` and
vllm/entrypoints/openai/models/serving.py `OpenAIServingModels.resolve_lora` /
`show_available_models`, the versions quoted in docs/fine-tuning.md):

- a request's `model` that is a served base name, or the name of an adapter already loaded,
  is served (the answer's `model` echoes the adapter name);
- otherwise, only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is true, every registered resolver is
  asked in turn with (the base model string given to `vllm serve`, the name); the first that
  returns a LoRARequest has it loaded and remembered under that name; if a resolver found one
  but loading failed for all, the answer is 400 "LoRA adapter '<name>' was found but could not
  be loaded." (BadRequestError);
- anything else is 404 "The model `<name>` does not exist." (NotFoundError, param "model");
- /v1/models lists the base card(s) and then one card per loaded adapter:
  `{id: name, root: adapter path, parent: the first served name}` (a resolver's LoRARequest
  carries no base_model_name, so vLLM names base_model_paths[0]). Adapters appear only after
  their first use. No `--enable-lora`: no adapter is ever served.

A simulated node takes resolvers: `static_resolver` (a fixed list of names it "has") or
`gateway_resolver`, which runs heady_node's real resolver logic (fetch from the gateway into a
cache dir, vLLM-compatibility check) so an e2e proves the node side of `ft:` routing too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CantLoad", "LoraRegistry", "gateway_resolver", "static_resolver"]


class CantLoad(Exception):
    """A resolver found the adapter but it cannot be loaded (vLLM's add_lora failing)."""


# (base model string, requested name) -> adapter path, None (not found) or raises CantLoad.
Resolver = Callable[[str, str], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str
    kind: str
    param: str | None


@dataclass
class LoraRegistry:
    base: str  # the `vllm serve` model string resolvers are asked with
    resolvers: list[Resolver] = field(default_factory=list)
    runtime_updating: bool = True  # VLLM_ALLOW_RUNTIME_LORA_UPDATING
    loaded: dict[str, str] = field(default_factory=dict)  # name -> path, in load order
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def check(self, name: str) -> Refusal | None:
        """None: `name` is a loaded adapter (after resolving it if need be); else the refusal.
        Callers check base names first."""
        if name in self.loaded:
            return None
        if self.runtime_updating and name:
            lock = self._locks.setdefault(name, asyncio.Lock())
            async with lock:
                if name in self.loaded:
                    return None
                found = False
                for resolve in self.resolvers:
                    try:
                        path = await resolve(self.base, name)
                    except CantLoad:
                        found = True
                        continue
                    if path is not None:
                        self.loaded[name] = path
                        return None
                if found:
                    return Refusal(
                        400,
                        f"LoRA adapter '{name}' was found but could not be loaded.",
                        "BadRequestError",
                        None,
                    )
        return Refusal(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    def cards(self, parent: str) -> list[tuple[str, str, str]]:
        """(id, root, parent) of every loaded adapter, in load order."""
        return [(name, path, parent) for name, path in self.loaded.items()]

    def reset(self) -> None:
        self.loaded.clear()


def static_resolver(names: Iterable[str], root: str = "/sim/loras") -> Resolver:
    """Resolves exactly `names` (whatever the base), each to `<root>/<slug>`."""
    known = frozenset(names)

    async def resolve(base: str, name: str) -> str | None:
        from heady_shared import ftnames

        if name not in known:
            return None
        slug = ftnames.slug(name) if ftnames.ft_base(name) else name.replace("/", "_")
        return f"{root}/{slug}"

    return resolve


def gateway_resolver(gateway_url: str, credential: str, cache_dir: str | Path) -> Resolver:
    """heady_node's resolver logic: the adapter fetched from the gateway into `cache_dir`
    (heady_node.finetune.resolver.AdapterCache). As the real plugin, a gateway or archive
    failure resolves nothing (vLLM then answers 404), it is logged there."""
    from heady_node.finetune.resolver import AdapterCache, FetchError

    cache = AdapterCache(Path(cache_dir), gateway_url, credential)
    cache.cache_dir.mkdir(parents=True, exist_ok=True)

    async def resolve(base: str, name: str) -> str | None:
        import tarfile

        try:
            path = await asyncio.to_thread(cache.get, base, name)
        except (FetchError, OSError, tarfile.TarError):
            return None
        return None if path is None else str(path)

    return resolve
