"""Which handler serves a request: a table of rows (methods + path pattern -> handler name),
first match wins. Pure, so every rule is unit-tested in CPython; the shell (entry.py) maps
handler names to its methods.

A pattern is a path of literal text and `{name}` segments (one non-empty segment, captured);
a trailing `/**` also matches everything below it (captured as `rest`, starting with "/").
Order matters only where patterns overlap: a path the gateway serves itself under a role
(`/api/heavy/{role}/v1/files/**`) must come before the row that forwards the rest to nodes.

When a request's path matches a row but its method does not, the row's `other_methods`
decides: "405" answers Method Not Allowed (with an Allow header), "next" tries later rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Auth = Literal["none", "client", "node"]  # who may call: anyone, a client key, a node token
GET_HEAD = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Row:
    handler: str  # the shell's handler for it
    pattern: str
    methods: frozenset[str] | None = None  # None: every method
    auth: Auth = "client"
    needs_fleet: bool = False  # answered 503 when the node configuration is unusable
    other_methods: Literal["405", "next"] = "405"
    # Compiled `pattern`: literal texts and capture names in order, and the tail flag.
    _parts: tuple[tuple[bool, str], ...] = field(init=False, repr=False, compare=False)
    _tail: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts, tail = compile_pattern(self.pattern)
        object.__setattr__(self, "_parts", parts)
        object.__setattr__(self, "_tail", tail)

    def match(self, path: str) -> dict[str, str] | None:
        """The captured values when `path` fits the pattern, else None."""
        params: dict[str, str] = {}
        pos = 0
        for is_name, text in self._parts:
            if is_name:
                end = path.find("/", pos)
                end = len(path) if end < 0 else end
                if end == pos:
                    return None
                params[text] = path[pos:end]
                pos = end
            elif path.startswith(text, pos):
                pos += len(text)
            else:
                return None
        if pos == len(path):
            if self._tail:
                params["rest"] = ""
            return params
        if self._tail and path[pos] == "/":
            params["rest"] = path[pos:]
            return params
        return None

    @property
    def allow(self) -> str:
        """The Allow header of this row's 405."""
        return ", ".join([*sorted(self.methods or ()), "OPTIONS"])


def compile_pattern(pattern: str) -> tuple[tuple[tuple[bool, str], ...], bool]:
    if not pattern.startswith("/"):
        raise ValueError(f"pattern {pattern!r} must start with '/'")
    tail = pattern.endswith("/**")
    body = pattern[:-3] if tail else pattern
    if "*" in body:
        raise ValueError(f"pattern {pattern!r}: '**' only as the last segment")
    parts: list[tuple[bool, str]] = []
    literal = ""
    for segment in body.split("/")[1:] if body else []:
        if segment.startswith("{") and segment.endswith("}"):
            name = segment[1:-1]
            if not name.isidentifier() or name == "rest":
                raise ValueError(f"pattern {pattern!r}: bad capture {segment!r}")
            parts.append((False, literal + "/"))
            parts.append((True, name))
            literal = ""
        else:
            literal += "/" + segment
    if literal:
        parts.append((False, literal))
    return tuple((n, t) for n, t in parts if n or t), tail


@dataclass(frozen=True, slots=True)
class Match:
    row: Row
    params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    row: Row  # the row whose path matched; its `allow` is the answer's Allow header


def resolve(table: tuple[Row, ...], method: str, path: str) -> Match | MethodNotAllowed | None:
    """The first row whose methods and pattern fit; MethodNotAllowed when the first row whose
    pattern fits says "405" for this method; None when no row fits (the shell's 404)."""
    for row in table:
        methods = row.methods
        if methods is not None and method not in methods and row.other_methods == "next":
            continue  # cheap: no path work for a row this method can never reach
        params = row.match(path)
        if params is None:
            continue
        if methods is None or method in methods:
            return Match(row, params)
        return MethodNotAllowed(row)
    return None


# The gateway's routes. A new route is one row (and its handler in entry.Default):
#   - a path the gateway serves itself under a role, before "forward":
#       Row("files", "/api/heavy/{role}/v1/files/**", frozenset({"GET", "POST", "DELETE"}))
#   - a node-facing route, authenticated by a node credential instead of a client key:
#       Row("node_lease", "/api/nodes/v1/leases", frozenset({"POST"}), auth="node")
ROUTES: tuple[Row, ...] = (
    # CORS preflight, for any path.
    Row("preflight", "/**", frozenset({"OPTIONS"}), auth="none", other_methods="next"),
    Row("healthz", "/healthz", GET_HEAD, auth="none", other_methods="next"),
    Row("status", "/api/status", GET_HEAD),
    # Files + Batch API, answered by the gateway itself (src/jobs_shell.py; docs/batch.md).
    Row("files", "/api/heavy/{role}/v1/files", frozenset({"GET", "POST"})),
    Row("file", "/api/heavy/{role}/v1/files/{id}", frozenset({"GET", "DELETE"})),
    Row("file_content", "/api/heavy/{role}/v1/files/{id}/content", frozenset({"GET"})),
    Row("batches", "/api/heavy/{role}/v1/batches", frozenset({"GET", "POST"})),
    Row("batch", "/api/heavy/{role}/v1/batches/{id}", frozenset({"GET"})),
    Row("batch_cancel", "/api/heavy/{role}/v1/batches/{id}/cancel", frozenset({"POST"})),
    # Fine-tuning jobs (src/ft_shell.py; docs/fine-tuning-jobs.md).
    Row("ft_jobs", "/api/heavy/{role}/v1/fine_tuning/jobs", frozenset({"GET", "POST"})),
    Row("ft_job", "/api/heavy/{role}/v1/fine_tuning/jobs/{id}", frozenset({"GET"})),
    Row("ft_cancel", "/api/heavy/{role}/v1/fine_tuning/jobs/{id}/cancel", frozenset({"POST"})),
    Row("ft_events", "/api/heavy/{role}/v1/fine_tuning/jobs/{id}/events", frozenset({"GET"})),
    Row(
        "ft_checkpoints",
        "/api/heavy/{role}/v1/fine_tuning/jobs/{id}/checkpoints",
        frozenset({"GET"}),
    ),
    Row("jobs_unknown", "/api/heavy/{role}/v1/files/**"),  # never forwarded to a node
    Row("jobs_unknown", "/api/heavy/{role}/v1/batches/**"),
    Row("jobs_unknown", "/api/heavy/{role}/v1/fine_tuning/**"),
    # The node's model list plus the caller's fine-tuned models (other methods: forwarded).
    Row(
        "models",
        "/api/heavy/{role}/v1/models",
        frozenset({"GET"}),
        needs_fleet=True,
        other_methods="next",
    ),
    Row("forward", "/api/heavy/**", auth="client", needs_fleet=True),
    # The node API: batch workers lease work with their node credential (nodeauth).
    Row("node_lease", "/api/nodes/v1/leases", frozenset({"POST"}), auth="node"),
    Row("node_input", "/api/nodes/v1/leases/{id}/input", frozenset({"GET"}), auth="node"),
    Row("node_heartbeat", "/api/nodes/v1/leases/{id}/heartbeat", frozenset({"POST"}), auth="node"),
    Row(
        "node_results", "/api/nodes/v1/leases/{id}/results/{part}", frozenset({"PUT"}), auth="node"
    ),
    Row("node_commit", "/api/nodes/v1/leases/{id}/commit", frozenset({"POST"}), auth="node"),
    Row("node_release", "/api/nodes/v1/leases/{id}/release", frozenset({"POST"}), auth="node"),
    # ... and training nodes (train leases `ftlease-...`), LoRA resolvers fetch adapters.
    Row(
        "node_validation",
        "/api/nodes/v1/leases/{id}/validation",
        frozenset({"GET"}),
        auth="node",
    ),
    Row(
        "node_checkpoint",
        "/api/nodes/v1/leases/{id}/checkpoint",
        frozenset({"GET"}),
        auth="node",
    ),
    Row("node_events", "/api/nodes/v1/leases/{id}/events", frozenset({"POST"}), auth="node"),
    Row(
        "node_checkpoint_put",
        "/api/nodes/v1/leases/{id}/checkpoints/{step}",
        frozenset({"PUT"}),
        auth="node",
    ),
    Row("node_adapter_put", "/api/nodes/v1/leases/{id}/adapter", frozenset({"PUT"}), auth="node"),
    Row("node_adapter", "/api/nodes/v1/adapters/{slug}", frozenset({"GET"}), auth="node"),
    Row("jobs_unknown", "/api/nodes/**", auth="node"),
    Row("page", "/", GET_HEAD, auth="none", other_methods="next"),  # status_page.PATH
)
