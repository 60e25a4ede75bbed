"""Pure helpers of the node package: tunnel URL parsing, metrics, paste lines, secrets."""

import pytest

from heady_node import colab, status, tunnel, wrangler
from heady_shared.metrics import parse_metrics

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct-AWQ"} 2.0
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct-AWQ"} 5.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 40.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 2.0
vllm:weird{label="a b"} NaN
not a metric line
"""


def test_metrics_to_status_line() -> None:
    snap = status.snapshot(parse_metrics(VLLM_METRICS))
    assert snap == status.Snapshot(served=42, running=2, waiting=5)
    line = status.status_line("12:00:00", 3, "code", snap)
    assert line == "[12:00:00] node 3 (code) up | served 42 | running 2 | queue 5"
    assert "DOWN: ConnectError" in status.status_line("t", 1, "reasoning", None, "ConnectError")
    assert "served ?" in status.status_line("t", 1, "r", status.snapshot({}))


def test_ngrok_url_from_the_agents_api() -> None:
    # Shape of GET http://127.0.0.1:4040/api/tunnels (https://ngrok.com/docs/agent/api/).
    payload = {
        "tunnels": [
            {
                "public_url": "https://other.ngrok-free.dev",
                "config": {"addr": "http://localhost:9"},
            },
            {
                "name": "command_line",
                "public_url": "https://ab12.ngrok-free.dev",
                "proto": "https",
                "config": {"addr": "http://127.0.0.1:8000", "inspect": True},
            },
        ],
        "uri": "/api/tunnels",
    }
    assert tunnel.ngrok_url_from_api(payload, 8000, None) == "https://ab12.ngrok-free.dev"
    assert tunnel.ngrok_url_from_api(payload, 8001, None) is None  # another agent's tunnel
    assert tunnel.ngrok_url_from_api({"tunnels": []}, 8000, None) is None
    for junk in (None, [], {"tunnels": "x"}, {"tunnels": [1, {"public_url": 5}]}):
        assert tunnel.ngrok_url_from_api(junk, 8000, None) is None
    with pytest.raises(tunnel.TunnelError, match="not the configured"):
        tunnel.ngrok_url_from_api(payload, 8000, "https://mine.ngrok-free.dev")


def test_ngrok_error_codes_become_reasons() -> None:
    log = 'lvl=eror msg="failed to start tunnel" err="... ERR_NGROK_334 ..."'
    assert "another node" in tunnel.explain("ngrok", log)
    assert "own account" in tunnel.explain("ngrok", "ERR_NGROK_108")
    assert tunnel.explain("ngrok", "all fine") == ""
    assert tunnel.explain("cloudflare", "ERR_NGROK_334") == ""


def test_cloudflare_ready_uses_known_hostname() -> None:
    plan = tunnel.cloudflare_plan("tok", "node3.example.com")
    assert plan.url == "https://node3.example.com"
    assert "tok" not in plan.argv and plan.env == {"TUNNEL_TOKEN": "tok"}


def test_quick_tunnels_and_bad_urls_are_refused() -> None:
    with pytest.raises(tunnel.TunnelError, match="SSE"):
        tunnel.cloudflare_plan("tok", "random-words.trycloudflare.com")
    with pytest.raises(tunnel.TunnelError, match="https"):
        tunnel.public_url("http://x.ngrok-free.app")
    with pytest.raises(tunnel.TunnelError, match="NGROK_AUTHTOKEN"):
        tunnel.ngrok_plan(8000, "")
    with pytest.raises(tunnel.TunnelError, match="CF_TUNNEL_TOKEN"):
        tunnel.cloudflare_plan("", "node.example.com")


def test_ngrok_plan_uses_url_flag_and_keeps_token_out_of_argv() -> None:
    plan = tunnel.ngrok_plan(8000, "secret-token", domain="me.ngrok-free.dev")
    assert "secret-token" not in " ".join(plan.argv)
    assert plan.env["NGROK_AUTHTOKEN"] == "secret-token"
    assert plan.argv[:3] == ["ngrok", "http", "http://127.0.0.1:8000"]
    assert plan.argv[-2:] == ["--url", "https://me.ngrok-free.dev"]
    assert "--domain" not in plan.argv
    assert (plan.url, plan.port, plan.api_url) == (
        "https://me.ngrok-free.dev",
        8000,
        "http://127.0.0.1:4040",
    )


def test_paste_block() -> None:
    lines = wrangler.paste_block(5, "https://ab12.ngrok-free.app")
    assert "  npx wrangler secret put COLAB_ENDPOINT_5" in lines
    assert "  echo https://ab12.ngrok-free.app | npx wrangler secret put COLAB_ENDPOINT_5" in lines
    assert '  COLAB_ENDPOINT_5="https://ab12.ngrok-free.app"' in lines
    assert lines[0].startswith("Node 5 (vision) is live")
    with pytest.raises(ValueError):
        wrangler.secret_name(9)


def test_secrets_prefer_colab_then_env() -> None:
    def colab_get(name: str) -> str:
        if name == "NGROK_AUTHTOKEN":
            return "from-colab"
        raise RuntimeError("SecretNotFoundError")

    env = {"NGROK_AUTHTOKEN": "from-env", "NODE_TOKEN": " env-token \n"}
    assert colab.get_secret("NGROK_AUTHTOKEN", colab_get=colab_get, env=env) == "from-colab"
    assert colab.get_secret("NODE_TOKEN", colab_get=colab_get, env=env) == "env-token"
    assert colab.get_secret("MISSING", colab_get=colab_get, env=env) == ""
    assert colab.get_secret("NODE_TOKEN", env=env) == "env-token"  # outside Colab
