"""dispatch.py: the route table — pattern matching, first match wins, methods (405 or the
next row), the gateway's own rows, and room for the routes to come (a gateway-owned path
under a role beats forwarding; node-facing rows carry their own auth)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch import GET_HEAD, ROUTES, Match, MethodNotAllowed, Row, compile_pattern, resolve

# ---- patterns ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "params"),
    [
        ("/healthz", "/healthz", {}),
        ("/healthz", "/healthz/", None),
        ("/healthz", "/healthzz", None),
        ("/", "/", {}),
        ("/", "/x", None),
        ("/**", "/", {"rest": "/"}),
        ("/**", "/a/b", {"rest": "/a/b"}),
        ("/api/heavy/**", "/api/heavy", {"rest": ""}),
        ("/api/heavy/**", "/api/heavy/", {"rest": "/"}),
        ("/api/heavy/**", "/api/heavy/code/v1/models", {"rest": "/code/v1/models"}),
        ("/api/heavy/**", "/api/heavyweight", None),
        ("/api/heavy/{role}/v1/files/**", "/api/heavy/code/v1/files", {"role": "code", "rest": ""}),
        (
            "/api/heavy/{role}/v1/files/**",
            "/api/heavy/code/v1/files/file-1/content",
            {"role": "code", "rest": "/file-1/content"},
        ),
        ("/api/heavy/{role}/v1/files/**", "/api/heavy/code/v1/filesx", None),
        ("/api/heavy/{role}/v1/files/**", "/api/heavy//v1/files", None),  # empty segment
        ("/api/heavy/{role}/v1/files/**", "/api/heavy/code/v1/chat/completions", None),
        ("/api/heavy/{role}/v1/batches", "/api/heavy/batch/v1/batches", {"role": "batch"}),
        ("/api/heavy/{role}/v1/batches", "/api/heavy/batch/v1/batches/b1", None),
        ("/a/{x}/{y}", "/a/1/2", {"x": "1", "y": "2"}),
        ("/a/{x}/{y}", "/a/1", None),
        ("/a/{x}", "/a/1/2", None),
    ],
)
def test_pattern_matching(pattern, path, params):
    assert Row("h", pattern).match(path) == params


@pytest.mark.parametrize("bad", ["healthz", "/a/**/b", "/a*", "/a/{}", "/a/{rest}", "/a/{1x}"])
def test_bad_patterns_are_refused_when_the_table_is_built(bad):
    with pytest.raises(ValueError):
        compile_pattern(bad)


segment = st.text(st.sampled_from("abc-_.%2"), min_size=1, max_size=6)


@given(st.lists(segment, min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_a_tail_pattern_captures_exactly_what_follows_its_prefix(segments):
    path = "/" + "/".join(segments)
    got = Row("h", "/" + segments[0] + "/**").match(path)
    assert got == {"rest": path[len(segments[0]) + 1 :]}
    role = Row("h", "/{role}/**").match(path)
    assert role is not None and "/" + role["role"] + role["rest"] == path


# ---- resolve: first match, methods ---------------------------------------------------------

TABLE = (
    Row("preflight", "/**", frozenset({"OPTIONS"}), auth="none", other_methods="next"),
    Row("files", "/api/heavy/{role}/v1/files/**", frozenset({"GET", "POST", "DELETE"})),
    Row("forward", "/api/heavy/**", needs_fleet=True),
    Row("lease", "/api/nodes/v1/lease", frozenset({"POST"}), auth="node"),
    Row("open", "/open", GET_HEAD, auth="none", other_methods="next"),
)


def test_a_gateway_owned_path_under_a_role_wins_over_forwarding():
    got = resolve(TABLE, "POST", "/api/heavy/batch/v1/files")
    assert isinstance(got, Match) and got.row.handler == "files"
    assert got.params == {"role": "batch", "rest": ""}
    other = resolve(TABLE, "POST", "/api/heavy/batch/v1/chat/completions")
    assert isinstance(other, Match) and other.row.handler == "forward"


def test_a_method_the_first_fitting_row_refuses_is_405_with_its_allow():
    got = resolve(TABLE, "PUT", "/api/heavy/batch/v1/files/f1")
    assert isinstance(got, MethodNotAllowed) and got.row.handler == "files"
    assert got.row.allow == "DELETE, GET, POST, OPTIONS"


def test_a_next_row_lets_other_methods_fall_through():
    assert resolve(TABLE, "POST", "/open") is None  # the shell's 404
    assert resolve(TABLE, "GET", "/nowhere") is None
    assert resolve(TABLE, "OPTIONS", "/api/heavy/batch/v1/files").row.handler == "preflight"


def test_node_routes_carry_their_own_auth():
    got = resolve(TABLE, "POST", "/api/nodes/v1/lease")
    assert isinstance(got, Match) and got.row.auth == "node"


# ---- the gateway's table ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "handler"),
    [
        ("OPTIONS", "/api/heavy/code/v1/chat/completions", "preflight"),
        ("OPTIONS", "/nowhere", "preflight"),
        ("GET", "/healthz", "healthz"),
        ("HEAD", "/healthz", "healthz"),
        ("POST", "/healthz", None),  # 404, as before the table
        ("GET", "/api/status", "status"),
        ("POST", "/api/status", 405),
        ("POST", "/api/heavy/code/v1/chat/completions", "forward"),
        ("DELETE", "/api/heavy/code/v1/x", "forward"),  # parse_route judges the method
        ("GET", "/api/heavy", "forward"),  # parse_route answers the unknown role
        ("GET", "/api/heavyweight", None),
        ("GET", "/", "page"),
        ("HEAD", "/", "page"),
        ("POST", "/", None),
        ("GET", "/index.html", None),
        # Files + Batch API: the gateway's own, never forwarded
        ("POST", "/api/heavy/batch/v1/files", "files"),
        ("GET", "/api/heavy/batch/v1/files", "files"),
        ("GET", "/api/heavy/batch/v1/files/file-1", "file"),
        ("DELETE", "/api/heavy/batch/v1/files/file-1", "file"),
        ("GET", "/api/heavy/batch/v1/files/file-1/content", "file_content"),
        ("GET", "/api/heavy/batch/v1/files/file-1/x/y", "jobs_unknown"),
        ("POST", "/api/heavy/code/v1/batches", "batches"),
        ("GET", "/api/heavy/code/v1/batches", "batches"),
        ("GET", "/api/heavy/code/v1/batches/batch_1", "batch"),
        ("POST", "/api/heavy/code/v1/batches/batch_1/cancel", "batch_cancel"),
        ("PUT", "/api/heavy/code/v1/batches/batch_1/x", "jobs_unknown"),
        ("POST", "/api/heavy/code/v1/filesystem", "forward"),
        # the node API
        ("POST", "/api/nodes/v1/leases", "node_lease"),
        ("GET", "/api/nodes/v1/leases/lease_1/input", "node_input"),
        ("POST", "/api/nodes/v1/leases/lease_1/heartbeat", "node_heartbeat"),
        ("PUT", "/api/nodes/v1/leases/lease_1/results/output", "node_results"),
        ("POST", "/api/nodes/v1/leases/lease_1/commit", "node_commit"),
        ("POST", "/api/nodes/v1/leases/lease_1/release", "node_release"),
        ("GET", "/api/nodes/v1/other", "jobs_unknown"),
        # fine-tuning jobs: the gateway's own, never forwarded
        ("POST", "/api/heavy/batch/v1/fine_tuning/jobs", "ft_jobs"),
        ("GET", "/api/heavy/batch/v1/fine_tuning/jobs", "ft_jobs"),
        ("GET", "/api/heavy/batch/v1/fine_tuning/jobs/ftjob-1", "ft_job"),
        ("POST", "/api/heavy/batch/v1/fine_tuning/jobs/ftjob-1/cancel", "ft_cancel"),
        ("GET", "/api/heavy/batch/v1/fine_tuning/jobs/ftjob-1/events", "ft_events"),
        ("GET", "/api/heavy/batch/v1/fine_tuning/jobs/ftjob-1/checkpoints", "ft_checkpoints"),
        ("GET", "/api/heavy/batch/v1/fine_tuning/other", "jobs_unknown"),
        ("GET", "/api/heavy/reasoning/v1/models", "models"),
        ("HEAD", "/api/heavy/reasoning/v1/models", "forward"),
        ("GET", "/api/heavy/reasoning/v1/models/some-model", "forward"),
        ("GET", "/api/nodes/v1/leases/ftlease-1/validation", "node_validation"),
        ("GET", "/api/nodes/v1/leases/ftlease-1/checkpoint", "node_checkpoint"),
        ("POST", "/api/nodes/v1/leases/ftlease-1/events", "node_events"),
        ("PUT", "/api/nodes/v1/leases/ftlease-1/checkpoints/12", "node_checkpoint_put"),
        ("PUT", "/api/nodes/v1/leases/ftlease-1/adapter", "node_adapter_put"),
        ("GET", "/api/nodes/v1/adapters/ft-x-0123", "node_adapter"),
    ],
)
def test_gateway_routes(method, path, handler):
    got = resolve(ROUTES, method, path)
    if handler is None:
        assert got is None
    elif handler == 405:
        assert isinstance(got, MethodNotAllowed) and got.row.allow == "GET, HEAD, OPTIONS"
    else:
        assert isinstance(got, Match) and got.row.handler == handler


def test_gateway_rows_auth_and_fleet_checks():
    rows = {r.handler: r for r in ROUTES}
    assert {h for h, r in rows.items() if r.auth == "none"} == {"preflight", "healthz", "page"}
    assert rows["status"].auth == rows["forward"].auth == "client"
    assert [h for h, r in rows.items() if r.needs_fleet] == ["models", "forward"]
    node_rows = [r for r in ROUTES if r.pattern.startswith("/api/nodes/")]
    assert node_rows and all(r.auth == "node" for r in node_rows)
    assert [r for r in ROUTES if r.auth == "node"] == node_rows
    for r in ROUTES:  # the gateway's own rows under a role come before the forward row
        if r.pattern.startswith("/api/heavy/{role}/"):
            assert ROUTES.index(r) < ROUTES.index(rows["forward"])


def test_every_handler_the_table_names_exists_in_the_shell():
    import ast
    from pathlib import Path

    entry = Path(__file__).resolve().parents[2] / "src" / "entry.py"
    tree = ast.parse(entry.read_text())
    handlers = next(
        n.value
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_HANDLERS"
    )
    assert isinstance(handlers, ast.Dict)
    names = {k.value for k in handlers.keys if isinstance(k, ast.Constant)}
    assert {r.handler for r in ROUTES} == names
