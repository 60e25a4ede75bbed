"""One simulated GPU node: a vLLM-like OpenAI server whose failure mode can be switched live.

Healthy, it behaves like ``vllm serve`` wherever the gateway's behaviour depends on it (each
rule cites the vLLM source it mirrors; "vLLM" below is vllm-project/vllm, 0.2x-0.3x):

- served names: ``--served-model-name a b c`` makes the engine answer to each name; a request
  whose ``model`` is none of them gets 404 ``The model `x` does not exist.`` (NotFoundError),
  a request without ``model`` is served by the first name
  (vllm/entrypoints/openai/models/serving.py ``check_model``/``show_available_models``,
  vllm/entrypoints/openai/engine/serving.py ``_check_model``/``_is_model_supported``);
- ``--api-key`` is checked only for paths starting with ``/v1``, ``/v2``, ``/inference`` or
  ``/cohere`` and never for OPTIONS; a miss is 401 ``{"error": "Unauthorized"}``
  (vllm/entrypoints/serve/utils/server_utils.py ``AuthenticationMiddleware``; the limits are
  documented in docs/usage/security.md "API Key Authentication Limitations");
- the endpoints beside ``/v1``: ``/health``, ``/ping``, ``/version``, ``/load``, ``/metrics``,
  ``/tokenize``, ``/detokenize``, ``/invocations`` (inference, unauthenticated), ``/pause``,
  ``/resume``, ``/is_paused``; with ``VLLM_SERVER_DEV_MODE=1`` also ``/sleep``, ``/wake_up``,
  ``/is_sleeping``, ``/reset_prefix_cache``, ``/reset_mm_cache``, ``/collective_rpc`` and
  ``/server_info`` (vllm/entrypoints/serve/*/api_router.py; docs/usage/security.md lists them);
- any other path is FastAPI's 404 ``{"detail":"Not Found"}``, a known path with the wrong
  method its 405 ``{"detail":"Method Not Allowed"}``;
- errors use vLLM's ``ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}``
  (vllm/entrypoints/openai/engine/protocol.py ``ErrorInfo``);
- streams are ``text/event-stream; charset=utf-8`` and end with ``data: [DONE]``.

Run alone as a stand-in for ``vllm serve``::

    python -m sim.node [serve] [MODEL] --port P [--host H] [--node N] [--api-key K]
                       [--served-model-name A [B ...]] [--model M] [--max-num-seqs S]
                       [--sim-token-s T] [--sim-images GPU [--sim-image-s S]]
                       [...ignored vLLM flags]

The package, one job per module: ``modes`` (what a node can be switched to), ``vllm`` (the
healthy vLLM API), ``faults`` (what a failing node sends), ``record`` (what reached it),
``capacity`` (``--max-num-seqs`` and time per token), ``images`` (the image engine a vision
node runs beside vLLM, and its capabilities), ``lifecycle`` (``Node``: port, mode,
start/stop), ``cli`` (``python -m sim.node``).
"""

from sim.node.capacity import Capacity
from sim.node.cli import main
from sim.node.lifecycle import DEFAULT_MODEL, Node
from sim.node.modes import MODES, ModeConfig, parse_mode
from sim.node.record import HISTORY, RecordedRequest
from sim.node.vllm import GUARDED_PREFIX, MAX_MODEL_LEN, VLLM_VERSION
from sim.node.wire import error_body

__all__ = [
    "DEFAULT_MODEL",
    "GUARDED_PREFIX",
    "HISTORY",
    "MAX_MODEL_LEN",
    "MODES",
    "VLLM_VERSION",
    "Capacity",
    "ModeConfig",
    "Node",
    "RecordedRequest",
    "error_body",
    "main",
    "parse_mode",
]
