"""`heady probe | secrets | status` with pytest-httpx: every failure mode, exit codes, output."""

import json
import stat
from pathlib import Path

import httpx
import pytest
from pytest_httpx import HTTPXMock

from heady_cli.config import CliError, mask_url, parse_dev_vars, validate_url
from heady_cli.main import main

TOKEN = "node-token-SECRET"
HOSTS = {n: f"https://node{n}-abcdef.ngrok-free.app" for n in range(1, 9)}
MODELS = json.dumps({"object": "list", "data": [{"id": "Qwen/Qwen2.5-7B-Instruct-AWQ"}]})
METRICS = 'vllm:num_requests_waiting{model_name="m"} 3.0\nvllm:num_requests_running 1.0\n'


def dev_vars(tmp_path: Path, nodes: dict[int, str] = HOSTS, token: str | None = TOKEN) -> str:
    lines = ["# written by the test", ""]
    if token is not None:
        lines.append(f'NODE_TOKEN="{token}"')
    lines += [f"COLAB_ENDPOINT_{n}={url}" for n, url in nodes.items()]
    path = tmp_path / ".dev.vars"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def healthy(httpx_mock: HTTPXMock, base: str, queue: bool = True) -> None:
    httpx_mock.add_response(url=f"{base}/health", text="")
    httpx_mock.add_response(url=f"{base}/v1/models", text=MODELS)
    if queue:
        httpx_mock.add_response(url=f"{base}/metrics", text=METRICS)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_keys = ["NODE_TOKEN", "GATEWAY_API_KEY", "HEADY_GATEWAY_URL"]
    env_keys += ["ROUTES", "HEALTH_PATH", "METRICS_PATH"]
    for key in env_keys + [f"COLAB_ENDPOINT_{n}" for n in range(1, 9)]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray ./.dev.vars


# --- pure helpers ------------------------------------------------------------------------


def test_dev_vars_format() -> None:
    text = "# c\n\nA=1\nB=\"two words\"\nC='x#y'\nD=plain # comment\nexport E=e\n"
    assert parse_dev_vars(text) == {"A": "1", "B": "two words", "C": "x#y", "D": "plain", "E": "e"}
    with pytest.raises(CliError, match="line 1"):
        parse_dev_vars("not a pair")


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://ab12.ngrok-free.app", "https://ab12.ngrok-free.app"),
        ("https://node3.example.com/", "https://node3.example.com"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ],
)
def test_valid_urls(url: str, ok: str) -> None:
    assert validate_url(url) == ok


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ab12.ngrok-free.app", "scheme"),
        ("ftp://x.example.com", "scheme"),
        ("https://", "no valid host"),
        ("https://user:pw@x.ngrok-free.app", "credentials"),
        ("http://x.ngrok-free.app", "plain http"),
        ("https://x.trycloudflare.com", "SSE"),
        ("https://x.example.com/?a=1", "query"),
        ("https://x.example.com:99999", "invalid port"),
        ("https://exa mple.com", "spaces"),
        ("https://localhostish", "no domain"),
    ],
)
def test_invalid_urls(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        validate_url(url)


def test_mask_url() -> None:
    assert mask_url("https://abcd-12-34.ngrok-free.app/x") == "https://ab…34.ngrok-free.app"
    assert mask_url("https://n1.example.com:8443") == "https://….example.com:8443"
    assert mask_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"


# --- probe -------------------------------------------------------------------------------


@pytest.mark.httpx_mock(assert_all_responses_were_requested=False)
def test_probe_every_failure_mode(
    httpx_mock: HTTPXMock, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = HOSTS
    healthy(httpx_mock, h[1])
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=f"{h[2]}/health")
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), url=f"{h[3]}/health")
    httpx_mock.add_response(url=f"{h[4]}/health", text="")
    httpx_mock.add_response(url=f"{h[4]}/v1/models", status_code=401, json={"error": "x"})
    httpx_mock.add_response(
        url=f"{h[5]}/health",
        status_code=404,
        headers={"ngrok-error-code": "ERR_NGROK_3200", "content-type": "text/html"},
        text="<html>The endpoint is offline</html>",
    )
    httpx_mock.add_response(url=f"{h[6]}/health", status_code=530, text="error code: 1033")
    httpx_mock.add_response(url=f"{h[7]}/health", text="")
    httpx_mock.add_response(url=f"{h[7]}/v1/models", text="{not json")
    httpx_mock.add_response(
        url=f"{h[8]}/health",
        headers={"content-type": "text/html"},
        text="<html>You are about to visit ... ngrok ... Visit Site</html>",
    )
    monkeypatch.setenv("COLUMNS", "250")  # one table row per node, no folding
    code = main(["probe", "--dev-vars", dev_vars(tmp_path), "--timeout", "2"])
    out = capsys.readouterr().out
    assert code == 1  # code, vision and batch have no healthy node
    cells = [line.split("│") for line in out.splitlines() if line.startswith("│ ")]
    rows = {int(c[1]): "│".join(c) for c in cells if c[1].strip().isdigit()}
    assert len(rows) == 8
    assert "up" in rows[1] and "Qwen/Qwen2.5-7B-Instruct-AWQ" in rows[1]
    assert "connection refused" in rows[2]
    assert "timed out after 2s" in rows[3]
    assert "NODE_TOKEN rejected" in rows[4]
    assert "ERR_NGROK_3200" in rows[5]
    assert "1033" in rows[6]
    assert "malformed JSON" in rows[7]
    assert "browser-warning" in rows[8]
    assert "No healthy node for role(s): code, vision, batch" in out
    assert TOKEN not in out and "node1-abcdef" not in out and "no…ef.ngrok-free.app" in out
    for req in httpx_mock.get_requests():
        assert req.headers["authorization"] == f"Bearer {TOKEN}"
        assert req.headers["ngrok-skip-browser-warning"] == "1"


def test_probe_all_healthy_json(httpx_mock: HTTPXMock, tmp_path: Path, capsys) -> None:
    nodes = {1: HOSTS[1], 3: HOSTS[3], 5: HOSTS[5], 7: HOSTS[7]}
    for url in nodes.values():
        healthy(httpx_mock, url)
    code = main(["probe", "--dev-vars", dev_vars(tmp_path, nodes), "--json", "--show-urls"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["uncovered_roles"] == []
    by_node = {n["node"]: n for n in data["nodes"]}
    assert by_node[1]["url"] == HOSTS[1] and by_node[1]["queue"] == 3
    assert by_node[2]["state"] == "unconfigured"


def test_probe_reads_environment(httpx_mock: HTTPXMock, monkeypatch, capsys) -> None:
    monkeypatch.setenv("NODE_TOKEN", TOKEN)
    monkeypatch.setenv("COLAB_ENDPOINT_1", HOSTS[1])
    healthy(httpx_mock, HOSTS[1], queue=False)
    httpx_mock.add_response(url=f"{HOSTS[1]}/metrics", status_code=404)
    assert main(["probe", "--json"]) == 1
    node1 = json.loads(capsys.readouterr().out)["nodes"][0]
    assert node1["state"] == "up" and node1["queue"] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("COLAB_ENDPOINT_1=https://a.ngrok-free.app\n", "NODE_TOKEN is not set"),
        ("NODE_TOKEN=x\n", "no COLAB_ENDPOINT"),
        ("this is not dev vars\n", "line 1 is not KEY=value"),
    ],
)
def test_probe_bad_input_is_one_line(tmp_path: Path, capsys, content: str, message: str) -> None:
    path = tmp_path / "vars"
    path.write_text(content)
    assert main(["probe", "--dev-vars", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("heady: error: ") and message in err


def test_probe_missing_file(tmp_path: Path, capsys) -> None:
    assert main(["probe", "--dev-vars", str(tmp_path / "nope")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_probe_asks_what_the_gateway_asks(httpx_mock: HTTPXMock, tmp_path: Path, capsys) -> None:
    # ROUTES, HEALTH_PATH and METRICS_PATH from .dev.vars are read as the gateway reads them:
    # roles from the operator's table, the node asked on the operator's paths.
    nodes = {1: HOSTS[1], 2: HOSTS[2], 5: HOSTS[5]}
    path = Path(dev_vars(tmp_path, nodes))
    routes = '{"roles": {"chat": [2, 5], "embed": [6]}, "fallback": [1]}'
    path.write_text(
        path.read_text() + f"ROUTES='{routes}'\nHEALTH_PATH=/ping\nMETRICS_PATH=/stats\n"
    )
    for url in (HOSTS[1], HOSTS[2]):
        httpx_mock.add_response(url=f"{url}/ping", text="")
        httpx_mock.add_response(url=f"{url}/v1/models", text=MODELS)
        httpx_mock.add_response(url=f"{url}/stats", text=METRICS)
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=f"{HOSTS[5]}/ping")
    assert main(["probe", "--dev-vars", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    by_node = {n["node"]: n for n in data["nodes"]}
    assert [by_node[n]["role"] for n in (1, 2, 5, 6)] == [None, "chat", "chat", "embed"]
    assert by_node[2]["state"] == "up" and by_node[2]["queue"] == 3
    assert by_node[5]["state"] == "down" and by_node[6]["state"] == "unconfigured"
    assert data["uncovered_roles"] == ["embed"]  # node 1 up, but only as the fallback
    assert {r.url.path for r in httpx_mock.get_requests()} == {"/ping", "/v1/models", "/stats"}


def test_probe_skips_the_load_when_metrics_path_is_empty(
    httpx_mock: HTTPXMock, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("NODE_TOKEN", TOKEN)
    monkeypatch.setenv("COLAB_ENDPOINT_1", HOSTS[1])
    monkeypatch.setenv("METRICS_PATH", "")
    healthy(httpx_mock, HOSTS[1], queue=False)  # any other request fails the test
    assert main(["probe", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["nodes"][0]["queue"] is None


def test_probe_bad_health_path_falls_back_with_a_warning(
    httpx_mock: HTTPXMock, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("NODE_TOKEN", TOKEN)
    monkeypatch.setenv("COLAB_ENDPOINT_1", HOSTS[1])
    monkeypatch.setenv("HEALTH_PATH", "//evil.example/x")
    healthy(httpx_mock, HOSTS[1])
    assert main(["probe", "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["nodes"][0]["state"] == "up"
    assert (
        err
        == "heady: warning: HEALTH_PATH: must be an absolute path such as /health; using /health\n"
    )


def test_probe_bad_routes_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("NODE_TOKEN", TOKEN)
    monkeypatch.setenv("COLAB_ENDPOINT_1", HOSTS[1])
    monkeypatch.setenv("ROUTES", '{"roles": {"code": [3, 9]}}')
    assert main(["probe"]) == 2
    err = capsys.readouterr().err
    assert err == "heady: error: ROUTES.roles.code: 9 is not a node number 1-8\n"


# --- secrets -----------------------------------------------------------------------------


def test_secrets_from_dev_vars(tmp_path: Path, capsys) -> None:
    path = dev_vars(tmp_path, {2: HOSTS[2] + "/", 1: HOSTS[1]})
    assert main(["secrets", "--dev-vars", path]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {"COLAB_ENDPOINT_1": HOSTS[1], "COLAB_ENDPOINT_2": HOSTS[2]}
    assert main(["secrets", "--dev-vars", path, "--with-token"]) == 0
    assert json.loads(capsys.readouterr().out)["NODE_TOKEN"] == TOKEN


def test_secrets_node_credential_and_node_secret(tmp_path: Path, capsys, monkeypatch) -> None:
    from heady_shared.nodeauth import node_of

    monkeypatch.delenv("NODE_SECRET", raising=False)
    path = tmp_path / ".dev.vars"
    path.write_text(f"COLAB_ENDPOINT_7={HOSTS[7]}\nNODE_SECRET=s3cret-value\n")
    assert main(["secrets", "--dev-vars", str(path), "--node-credential", "7"]) == 0
    cred = json.loads(capsys.readouterr().out)["HEADY_NODE_CREDENTIAL"]
    assert node_of("s3cret-value", cred) == 7 and "s3cret-value" not in cred
    assert main(["secrets", "--dev-vars", str(path), "--with-node-secret"]) == 0
    assert json.loads(capsys.readouterr().out)["NODE_SECRET"] == "s3cret-value"
    assert main(["secrets", "--dev-vars", str(path), "--node-credential", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    path.write_text(f"COLAB_ENDPOINT_7={HOSTS[7]}\n")
    assert main(["secrets", "--dev-vars", str(path), "--node-credential", "7"]) == 2
    assert "NODE_SECRET is not set" in capsys.readouterr().err


def test_secrets_from_args_and_file_to_output(tmp_path: Path, capsys) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(f"COLAB_ENDPOINT_4={HOSTS[4]}\n")
    out = tmp_path / "secrets.json"
    argv = ["secrets", "--file", str(listing), f"3={HOSTS[3]}", f"COLAB_ENDPOINT_8={HOSTS[8]}"]
    assert main([*argv, "-o", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {f"COLAB_ENDPOINT_{n}" for n in (3, 4, 8)}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"npx wrangler secret bulk {out}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["1=https://user:pw@x.ngrok-free.app"],
            "COLAB_ENDPOINT_1: URL must not carry credentials",
        ),
        (["2=x.ngrok-free.app"], "COLAB_ENDPOINT_2: URL needs a scheme"),
        (["9=https://x.example.com"], "out of range"),
        (["https://x.example.com"], "expected N=URL"),
        ([], "no endpoint URLs"),
    ],
)
def test_secrets_rejects_bad_input(capsys, args: list[str], message: str) -> None:
    assert main(["secrets", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err


# --- status ------------------------------------------------------------------------------

GATEWAY = "https://heady.example.workers.dev"


def gateway_status(**extra) -> dict:
    nodes = []
    for n in range(1, 9):
        role = ["reasoning", "code", "vision", "batch"][(n - 1) // 2]
        nodes.append(
            {
                "node": n, "roles": [role], "config": "configured", "config_reason": None,
                "state": "up" if n != 6 else "down", "since": "2025-01-01T00:00:00Z",
                "until": None, "reason": None if n != 6 else "ngrok endpoint offline",
                "failures": 0, "latency_ms": 42.5, "load": 1, "checked_at": None,
            }
        )  # fmt: skip
    nodes[0].update(extra)
    routes = {"reasoning": {"pair": [1, 2], "fallback": [1, 2]}}
    return {"gateway": {"version": "0.1.0"}, "nodes": nodes, "routes": routes}


def test_status_renders_table(httpx_mock: HTTPXMock, monkeypatch, capsys) -> None:
    monkeypatch.setenv("GATEWAY_API_KEY", "gw-key")
    httpx_mock.add_response(
        url=f"{GATEWAY}/api/status", json=gateway_status(gpu="T4", drained=True)
    )
    assert main(["status", "--gateway", GATEWAY]) == 0
    out = capsys.readouterr().out
    assert "Heady gateway 0.1.0" in out and "ngrok endpoint offline" in out
    assert "gpu=T4 drained=True" in out  # unknown fields shown, not fatal
    assert "42 ms" in out
    assert httpx_mock.get_requests()[0].headers["authorization"] == "Bearer gw-key"


def test_status_exit_1_when_a_role_is_down(httpx_mock: HTTPXMock, tmp_path: Path, capsys) -> None:
    body = gateway_status()
    for n in body["nodes"]:
        if "vision" in n["roles"]:
            n["state"] = "down"
    body["routes"] = {}
    httpx_mock.add_response(url=f"{GATEWAY}/api/status", json=body)
    path = tmp_path / "vars"
    path.write_text(f"HEADY_GATEWAY_URL={GATEWAY}\nGATEWAY_API_KEY=k\n")
    assert main(["status", "--dev-vars", str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["uncovered_roles"] == ["vision"]


def test_status_counts_unknown_nodes_as_available(httpx_mock: HTTPXMock, capsys) -> None:
    # Right after a deploy nothing has been observed: the gateway still routes to every
    # configured node, so no role is uncovered; an unknown but invalid node does not count.
    body = gateway_status()
    for n in body["nodes"]:
        n["state"] = "unknown"
        if "batch" in n["roles"]:
            n["config"] = "invalid"
    body["routes"] = {}  # the default four roles
    httpx_mock.add_response(url=f"{GATEWAY}/api/status", json=body)
    assert main(["status", "--gateway", GATEWAY, "--key", "k", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["uncovered_roles"] == ["batch"]


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            {"status_code": 401, "json": {"error": {"type": "auth", "message": "bad key"}}},
            "rejected the key (HTTP 401): bad key",
        ),
        (
            {
                "status_code": 200,
                "text": "<html>hi</html>",
                "headers": {"content-type": "text/html"},
            },
            "non-JSON (HTTP 200, text/html)",
        ),
        ({"status_code": 200, "json": {"hello": 1}}, "no 'nodes' list"),
        ({"status_code": 502, "json": {"error": {"message": "upstream"}}}, "HTTP 502: upstream"),
    ],
)
def test_status_bad_answers(httpx_mock: HTTPXMock, capsys, response: dict, message: str) -> None:
    httpx_mock.add_response(url=f"{GATEWAY}/api/status", **response)
    assert main(["status", "--gateway", GATEWAY, "--key", "k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    ("exc", "message"),
    [(httpx.ConnectError("no"), "cannot reach gateway"), (httpx.ReadTimeout("x"), "within 3s")],
)
def test_status_unreachable(httpx_mock: HTTPXMock, capsys, exc: Exception, message: str) -> None:
    httpx_mock.add_exception(exc, url=f"{GATEWAY}/api/status")
    assert main(["status", "--gateway", GATEWAY, "--key", "k", "--timeout", "3"]) == 2
    assert message in capsys.readouterr().err


def test_status_missing_key_or_url(capsys) -> None:
    assert main(["status", "--gateway", GATEWAY]) == 2
    assert "no gateway key" in capsys.readouterr().err
    assert main(["status", "--key", "k"]) == 2
    assert "no gateway URL" in capsys.readouterr().err
    assert main(["status", "--key", "k", "--gateway", "heady.example.com"]) == 2
    assert "must start with https://" in capsys.readouterr().err


# --- one verdict: `heady probe`/`heady secrets` and the gateway judge endpoints alike ----

VERDICT_TABLE = [
    "https://ab12.ngrok-free.app",
    "https://node3.example.com/",
    "https://node3.example.com/base//path/",
    "HTTPS://Node3.Example.COM",
    "http://127.0.0.1:8000",
    "http://localhost:8000",
    "http://[::1]:8000",
    "http://x.ngrok-free.app",
    "https://x.trycloudflare.com",
    "https://user:pw@x.ngrok-free.app",
    "https://x.example.com/?a=1",
    "https://x.example.com/#f",
    "https://x.example.com:99999",
    "https://x.example.com:0",
    "https://exa mple.com",
    "https://localhostish",
    "ftp://x.example.com",
    "x.example.com",
    "https://",
    "https://x.example.com/../y",
    "https://x.example.com/%2e%2e",
    "https://bücher.example.com",
    "https://.example.com",
    "",
]


@pytest.mark.parametrize("url", VERDICT_TABLE)
def test_cli_and_gateway_give_the_same_verdict(url: str) -> None:
    from config import load_config  # the Worker's own config module (src/ on the path)

    node = load_config({"COLAB_ENDPOINT_1": url}).node(1)
    try:
        cli = validate_url(url)
    except ValueError as exc:
        assert node.config in ("invalid", "unconfigured"), url
        assert node.reason == str(exc)
    else:
        assert node.config == "configured" and node.base_url == cli
