"""Secrets: Colab's Secrets panel when running in Colab, the environment otherwise."""

import os
from collections.abc import Callable, Mapping


def _colab_get() -> Callable[[str], str] | None:
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None
    return userdata.get


def get_secret(
    name: str,
    *,
    colab_get: Callable[[str], str] | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """'' when unset. Colab raises when the secret is missing or the notebook lacks access;
    either way we fall back to the environment so local runs and CI work the same."""
    getter = colab_get if colab_get is not None else _colab_get()
    if getter is not None:
        try:
            value = getter(name)
        except Exception:  # SecretNotFoundError / NotebookAccessError: fall back, don't crash
            value = None
        if value:
            return str(value).strip()
    return (env if env is not None else os.environ).get(name, "").strip()
