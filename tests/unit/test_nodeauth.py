"""Node credentials: hn1.<n>.<32 hex of HMAC-SHA256(NODE_SECRET, "heady-node:<n>")>."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from heady_shared.nodeauth import node_credential, node_of

SECRET = "s3cret-node-secret"


def test_credential_form_and_round_trip() -> None:
    for n in range(1, 9):
        cred = node_credential(SECRET, n)
        mac = hmac.new(SECRET.encode(), f"heady-node:{n}".encode(), hashlib.sha256)
        assert cred == f"hn1.{n}.{mac.hexdigest()[:32]}"
        assert node_of(SECRET, cred) == n


@pytest.mark.parametrize(
    "credential",
    [
        None,
        "",
        "sk-client-key",
        "hn1.7",
        "hn1.7.",
        "hn2.7." + "0" * 32,
        "hn1.9." + "0" * 32,
        "hn1.07x." + "0" * 32,
        "hn1.-1." + "0" * 32,
        "hn1.7." + "0" * 32,
        "hn1.7." + "a" * 200,
        b"hn1.7.00",
    ],
)
def test_refused(credential: object) -> None:
    assert node_of(SECRET, credential) is None


def test_another_nodes_mac_or_another_secret_is_refused() -> None:
    seven = node_credential(SECRET, 7)
    assert node_of(SECRET, seven.replace("hn1.7.", "hn1.8.")) is None
    assert node_of("other-secret", seven) is None
    assert node_of("", seven) is None
    assert node_of(None, seven) is None
    tampered = seven[:-1] + ("0" if seven[-1] != "0" else "1")
    assert node_of(SECRET, tampered) is None


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        node_credential("", 1)
    with pytest.raises(ValueError):
        node_credential(SECRET, 9)
