"""Per-node tunnel settings, resolved and checked before anything slow happens.

Colab secrets belong to the Google account, not to a notebook, so eight tabs of one account read
the same `CF_TUNNEL_TOKEN`. Started eight times, one Cloudflare tunnel token becomes eight replicas
of one tunnel (every role behind one hostname, traffic mixed); one ngrok account has one dev
domain. So every setting has a per-node name, `<NAME>_<node>` (e.g. `CF_TUNNEL_TOKEN_3`), and the
plain name is only a fallback for a cluster where no node has its own. Whatever can be seen from
here (the same token, tunnel, hostname or domain under two nodes' names) is refused.
"""

import base64
import binascii
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

from heady_node import tunnel
from heady_shared.routes import NODE_COUNT

Lookup = Callable[[str], str]  # secret name -> value, '' when unset

NGROK_TOKEN = "NGROK_AUTHTOKEN"
NGROK_DOMAIN = "NGROK_DOMAIN"
CF_TOKEN = "CF_TUNNEL_TOKEN"
CF_HOSTNAME = "CF_TUNNEL_HOSTNAME"
TUNNEL_KINDS = ("cloudflare", "ngrok", "none")


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Setting:
    value: str
    source: str | None  # the name it was read from, None when unset


@dataclass(frozen=True)
class TunnelSettings:
    kind: str  # "cloudflare" | "ngrok" | "none"
    token: Setting
    address: Setting  # CF hostname or ngrok domain (may be unset for ngrok)

    def plan(self, port: int, *, ngrok_api: str = tunnel.NGROK_API) -> tunnel.TunnelPlan | None:
        if self.kind == "cloudflare":
            return tunnel.cloudflare_plan(self.token.value, self.address.value)
        if self.kind == "ngrok":
            return tunnel.ngrok_plan(
                port, self.token.value, domain=self.address.value or None, api_url=ngrok_api
            )
        return None


def node_name(name: str, node: int) -> str:
    return f"{name}_{node}"


def resolve(name: str, node: int, lookup: Lookup) -> Setting:
    """`<NAME>_<node>` if set, else the plain `<NAME>` (single-node fallback)."""
    own = lookup(node_name(name, node)).strip()
    if own:
        return Setting(own, node_name(name, node))
    plain = lookup(name).strip()
    return Setting(plain, name if plain else None)


def _others(name: str, node: int, lookup: Lookup) -> dict[int, str]:
    """Values other nodes have under their own per-node name."""
    found = {}
    for other in range(1, NODE_COUNT + 1):
        if other != node and (value := lookup(node_name(name, other)).strip()):
            found[other] = value
    return found


def cloudflare_tunnel_id(token: str) -> str | None:
    """The tunnel id inside a Cloudflare tunnel token (base64 JSON {"a", "t", "s"}), if any:
    two different tokens of one tunnel still make replicas of it."""
    try:
        padded = token.strip() + "=" * (-len(token.strip()) % 4)
        data = json.loads(base64.b64decode(padded, validate=False))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    tunnel_id = data.get("t") if isinstance(data, dict) else None
    return tunnel_id if isinstance(tunnel_id, str) and tunnel_id else None


def _refuse_plain_when_split(name: str, node: int, setting: Setting, lookup: Lookup) -> None:
    others = _others(name, node, lookup)
    if setting.source == name and others:
        listed = ", ".join(node_name(name, n) for n in sorted(others))
        raise SettingsError(
            f"{node_name(name, node)} is not set, and the plain {name} is only a fallback for a "
            f"cluster where no node has its own ({listed} exist): add {node_name(name, node)}"
        )


def _refuse_shared(
    what: str, name: str, node: int, value: str, lookup: Lookup, key=lambda v: v
) -> None:
    mine = key(value)
    if mine is None:
        return
    for other, theirs in sorted(_others(name, node, lookup).items()):
        if key(theirs) == mine:
            raise SettingsError(
                f"node {node} and node {other} ({node_name(name, other)}) use the same {what}: "
                "each node needs its own, or both serve behind one address and the gateway "
                "cannot tell them apart"
            )


def tunnel_settings(kind: str, node: int, lookup: Lookup) -> TunnelSettings:
    """Every tunnel setting for `node`, validated. Raises SettingsError / tunnel.TunnelError with
    the secret names to fix; call it before the model loads."""
    if kind not in TUNNEL_KINDS:
        raise SettingsError(f"tunnel must be one of {', '.join(TUNNEL_KINDS)}, got {kind!r}")
    lookup = functools.cache(lookup)  # each name read once (Colab's store is a round trip)
    if kind == "none":
        return TunnelSettings(kind, Setting("", None), Setting("", None))
    if kind == "cloudflare":
        token, host = resolve(CF_TOKEN, node, lookup), resolve(CF_HOSTNAME, node, lookup)
        if not token.value:
            raise SettingsError(
                f"{node_name(CF_TOKEN, node)} is missing: create a named tunnel for node {node} "
                "in Cloudflare Zero Trust > Networks > Tunnels and store its token under that name"
            )
        if not host.value:
            raise SettingsError(
                f"{node_name(CF_HOSTNAME, node)} is missing: the tunnel's public hostname, whose "
                "service must be http://localhost:<engine port> (8000 by default)"
            )
        tunnel.public_url(host.value if "://" in host.value else f"https://{host.value}")
        for name, setting in ((CF_TOKEN, token), (CF_HOSTNAME, host)):
            _refuse_plain_when_split(name, node, setting, lookup)
        _refuse_shared("tunnel token", CF_TOKEN, node, token.value, lookup)
        _refuse_shared(
            "Cloudflare tunnel (token of the same tunnel id)",
            CF_TOKEN, node, token.value, lookup, key=cloudflare_tunnel_id,
        )  # fmt: skip
        _refuse_shared("hostname", CF_HOSTNAME, node, host.value, lookup, key=_host)
        return TunnelSettings(kind, token, host)
    token, domain = resolve(NGROK_TOKEN, node, lookup), resolve(NGROK_DOMAIN, node, lookup)
    if not token.value:
        raise SettingsError(
            f"{node_name(NGROK_TOKEN, node)} is missing: the authtoken of the ngrok account for "
            f"node {node} (https://dashboard.ngrok.com/get-started/your-authtoken)"
        )
    if domain.value:
        tunnel.public_url(f"https://{_host(domain.value)}")
    for name, setting in ((NGROK_TOKEN, token), (NGROK_DOMAIN, domain)):
        _refuse_plain_when_split(name, node, setting, lookup)
    if domain.value:
        _refuse_shared("ngrok domain", NGROK_DOMAIN, node, domain.value, lookup, key=_host)
    # One account may run several endpoints only on distinct domains (paid plans); without a
    # domain each agent takes the account's single dev domain and the second one fails.
    for other, theirs in sorted(_others(NGROK_TOKEN, node, lookup).items()):
        if theirs == token.value and not (
            domain.value and lookup(node_name(NGROK_DOMAIN, other)).strip()
        ):
            raise SettingsError(
                f"node {node} and node {other} use the same ngrok account "
                f"({node_name(NGROK_TOKEN, other)}) without their own {NGROK_DOMAIN}_<n>: an "
                "account has one dev domain, so only one of them could be online"
            )
    return TunnelSettings(kind, token, domain)


def _host(value: str) -> str:
    v = value.strip().lower()
    v = v.split("://", 1)[-1]
    return v.split("/", 1)[0]
