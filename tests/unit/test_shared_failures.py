"""heady_shared.failures: the failure-rule table over a node's response head."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest

from heady_shared.failures import (
    EXPLAIN,
    HEAD_FIELDS,
    NO_RESPONSE_EXPLAIN,
    RULES,
    connection_error_kind,
    match,
)

# ---- failure rules -------------------------------------------------------------------------


class Recording(Mapping[str, str | None]):
    """A head whose every field reads as set, remembering which fields a rule asked for."""

    def __init__(self) -> None:
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str | None:
        self.read.add(key)
        return "x"

    def get(self, key, default=None):
        self.read.add(key)
        return "x"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.reason)
def test_every_header_a_rule_reads_is_in_head_fields(rule):
    # the shell fetches only HEAD_FIELDS across the JS boundary: a rule reading anything
    # else would silently never match in the Worker
    for status in (200, 429, 502, 503, 504, 530):
        head = Recording()
        rule.matches(status, head)
        assert head.read <= set(HEAD_FIELDS), (rule.reason, head.read)


def test_rule_reasons_are_unique_and_explained():
    reasons = [r.reason for r in RULES]
    assert len(reasons) == len(set(reasons))
    assert set(EXPLAIN) == set(reasons) | {"refused", "timeout", "error"}
    assert set(NO_RESPONSE_EXPLAIN) == {"refused", "timeout", "error"}
    assert all(text and not text.endswith(".") for text in EXPLAIN.values())


def none(**fields: str) -> dict[str, str | None]:
    return dict.fromkeys(HEAD_FIELDS) | fields


@pytest.mark.parametrize(
    ("status", "head", "reason", "reads_retry_after"),
    [
        (200, none(), None, None),
        (404, none(), None, None),
        (500, none(), None, None),
        (501, none(), None, None),
        (200, none(**{"ngrok-error-code": "ERR_NGROK_3200"}), "tunnel_offline", False),
        (503, none(**{"ngrok-error-code": "ERR_NGROK_8012"}), "tunnel_offline", False),
        (200, none(**{"ngrok-error-code": ""}), None, None),
        (530, none(), "tunnel_down", False),
        (520, none(), "tunnel_down", False),
        (526, none(), "tunnel_down", False),
        (527, none(), None, None),
        (429, none(), "busy", True),
        (503, none(), "busy", True),
        (502, none(), "http_502", True),
        (504, none(), "http_504", True),
        (503, {}, "busy", True),  # fields may be missing altogether
    ],
)
def test_match_table(status, head, reason, reads_retry_after):
    rule = match(status, head)
    if reason is None:
        assert rule is None
    else:
        assert rule is not None and rule.reason == reason
        assert rule.retry_after is reads_retry_after


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("Network connection lost.", "refused"),
        ("connect ECONNREFUSED 127.0.0.1:9", "refused"),
        ("[Errno 111] Connection refused", "refused"),
        ("httpx.ConnectError: All connection attempts failed", "refused"),
        ("internal error; reference = abc", "error"),
        ("DNS lookup failed", "error"),
        ("TLS handshake failure", "error"),
        ("", "error"),
    ],
)
def test_connection_error_kind(message, kind):
    assert connection_error_kind(message) == kind
