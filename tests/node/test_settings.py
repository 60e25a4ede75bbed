"""Per-node tunnel secrets: resolution order and the conflicts refused before the model loads."""

import base64
import json

import pytest

from heady_node import settings, tunnel
from heady_node.settings import SettingsError, tunnel_settings


def lookup(values: dict[str, str]):
    return lambda name: values.get(name, "")


def cf_token(tunnel_id: str, secret: str = "s") -> str:
    raw = json.dumps({"a": "account", "t": tunnel_id, "s": secret}).encode()
    return base64.b64encode(raw).decode().rstrip("=")


def test_per_node_name_wins_and_plain_name_is_the_single_node_fallback() -> None:
    both = {"CF_TUNNEL_TOKEN": "plain", "CF_TUNNEL_TOKEN_3": "three"}
    assert settings.resolve("CF_TUNNEL_TOKEN", 3, lookup(both)) == settings.Setting(
        "three", "CF_TUNNEL_TOKEN_3"
    )
    got = settings.resolve("CF_TUNNEL_TOKEN", 4, lookup({"CF_TUNNEL_TOKEN": " plain\n"}))
    assert got == settings.Setting("plain", "CF_TUNNEL_TOKEN")
    assert settings.resolve("CF_TUNNEL_TOKEN", 4, lookup({})) == settings.Setting("", None)

    single = {"CF_TUNNEL_TOKEN": cf_token("t1"), "CF_TUNNEL_HOSTNAME": "node.example.com"}
    s = tunnel_settings("cloudflare", 5, lookup(single))
    assert (s.token.source, s.address.value) == ("CF_TUNNEL_TOKEN", "node.example.com")


def test_eight_cloudflare_nodes_each_with_their_own_tunnel() -> None:
    values = {}
    for n in range(1, 9):
        values[f"CF_TUNNEL_TOKEN_{n}"] = cf_token(f"tunnel-{n}")
        values[f"CF_TUNNEL_HOSTNAME_{n}"] = f"node{n}.example.com"
    for n in range(1, 9):
        s = tunnel_settings("cloudflare", n, lookup(values))
        assert s.token.source == f"CF_TUNNEL_TOKEN_{n}"
        plan = s.plan(8000)
        assert plan is not None and plan.url == f"https://node{n}.example.com"
        assert plan.env == {"TUNNEL_TOKEN": values[f"CF_TUNNEL_TOKEN_{n}"]}


@pytest.mark.parametrize(
    ("values", "match"),
    [
        # the same token under two nodes' names: replicas of one tunnel
        (
            {
                "CF_TUNNEL_TOKEN_3": "tok",
                "CF_TUNNEL_TOKEN_4": "tok",
                "CF_TUNNEL_HOSTNAME_3": "a.ex",
            },
            r"node 3 and node 4 \(CF_TUNNEL_TOKEN_4\) use the same tunnel token",
        ),
        # two different tokens of the same tunnel id: still replicas
        (
            {
                "CF_TUNNEL_TOKEN_3": cf_token("same", "x"),
                "CF_TUNNEL_TOKEN_7": cf_token("same", "y"),
                "CF_TUNNEL_HOSTNAME_3": "a.example.com",
            },
            r"node 3 and node 7 .* same Cloudflare tunnel",
        ),
        # the same public hostname
        (
            {
                "CF_TUNNEL_TOKEN_3": cf_token("t3"),
                "CF_TUNNEL_HOSTNAME_3": "api.example.com",
                "CF_TUNNEL_HOSTNAME_8": "https://API.example.com/",
            },
            r"node 3 and node 8 .* same hostname",
        ),
        # the plain name while other nodes have their own: the eight-tabs-one-account trap
        (
            {
                "CF_TUNNEL_TOKEN": cf_token("shared"),
                "CF_TUNNEL_HOSTNAME": "x.example.com",
                "CF_TUNNEL_TOKEN_1": cf_token("t1"),
            },
            r"CF_TUNNEL_TOKEN_3 is not set.*CF_TUNNEL_TOKEN_1 exist",
        ),
        ({"CF_TUNNEL_HOSTNAME_3": "a.example.com"}, r"CF_TUNNEL_TOKEN_3 is missing"),
        ({"CF_TUNNEL_TOKEN_3": "t"}, r"CF_TUNNEL_HOSTNAME_3 is missing"),
        ({"CF_TUNNEL_TOKEN_3": "t", "CF_TUNNEL_HOSTNAME_3": "x.trycloudflare.com"}, r"SSE"),
    ],
)
def test_cloudflare_conflicts_are_refused(values: dict[str, str], match: str) -> None:
    with pytest.raises((SettingsError, tunnel.TunnelError), match=match):
        tunnel_settings("cloudflare", 3, lookup(values))


def test_ngrok_per_node_accounts_and_domains() -> None:
    values = {
        "NGROK_AUTHTOKEN_1": "acct-1",
        "NGROK_AUTHTOKEN_2": "acct-2",
        "NGROK_DOMAIN_1": "one.ngrok-free.dev",
    }
    s = tunnel_settings("ngrok", 1, lookup(values))
    plan = s.plan(8123, ngrok_api="http://127.0.0.1:4041")
    assert plan is not None
    assert plan.argv[-2:] == ["--url", "https://one.ngrok-free.dev"]
    assert plan.env == {"NGROK_AUTHTOKEN": "acct-1"} and "acct-1" not in " ".join(plan.argv)
    assert (plan.port, plan.api_url) == (8123, "http://127.0.0.1:4041")
    no_domain = tunnel_settings("ngrok", 2, lookup(values)).plan(8000)
    assert no_domain is not None and "--url" not in no_domain.argv and no_domain.url is None

    # One account for two nodes works only when both have their own domain (paid plans).
    shared = {"NGROK_AUTHTOKEN_1": "acct", "NGROK_AUTHTOKEN_2": "acct"}
    with pytest.raises(SettingsError, match="same ngrok account"):
        tunnel_settings("ngrok", 2, lookup(shared))
    shared |= {"NGROK_DOMAIN_1": "a.example.com", "NGROK_DOMAIN_2": "b.example.com"}
    assert tunnel_settings("ngrok", 2, lookup(shared)).address.value == "b.example.com"
    shared["NGROK_DOMAIN_2"] = "A.example.com"
    with pytest.raises(SettingsError, match="same ngrok domain"):
        tunnel_settings("ngrok", 2, lookup(shared))
    with pytest.raises(SettingsError, match="NGROK_AUTHTOKEN_4 is missing"):
        tunnel_settings("ngrok", 4, lookup({}))


def test_no_tunnel_and_unknown_kinds() -> None:
    s = tunnel_settings("none", 2, lookup({}))
    assert s.plan(8000) is None
    with pytest.raises(SettingsError, match="tunnel must be one of"):
        tunnel_settings("quick", 2, lookup({}))


def test_tunnel_id_is_read_from_a_cloudflare_token() -> None:
    assert settings.cloudflare_tunnel_id(cf_token("abc-123")) == "abc-123"
    assert settings.cloudflare_tunnel_id("not base64 !!") is None
    assert settings.cloudflare_tunnel_id(base64.b64encode(b"[1, 2]").decode()) is None
