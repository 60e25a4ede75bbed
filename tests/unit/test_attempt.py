"""attempt.py: what a node's response head (or its absence) means, Retry-After, Attempt."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attempt import (
    MAX_RETRY_AFTER_S,
    Attempt,
    Head,
    judge,
    no_response,
    parse_retry_after,
)

NOW = 1_700_000_000.0


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def head(status: int, ngrok: str | None = None, retry_after: str | None = None) -> Head:
    return Head(status, {"ngrok-error-code": ngrok, "retry-after": retry_after})


# ---- judge: the model server's answers pass through ------------------------------------


PASSING = (200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 409, 413, 422, 500, 501)


@pytest.mark.parametrize("status", [*PASSING, 505, 507, 599])
def test_model_server_answers_pass_through(status):
    a = judge(5, head(status), 12.5, NOW)
    assert a == Attempt(5, "pass", "ok", status, 12.5, None)
    assert not a.node_failed


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500])
def test_pass_through_ignores_retry_after(status):
    assert judge(1, head(status, retry_after="30"), 1.0, NOW).retry_after_s is None


def test_head_without_the_rule_fields_passes():
    # the shell may hand over fewer fields than HEAD_FIELDS: a missing key reads as absent
    assert judge(2, Head(200, {}), 0.0, NOW) == Attempt(2, "pass", "ok", 200, 0.0)
    assert judge(2, Head(503, {}), 0.0, NOW) == Attempt(2, "failover", "busy", 503, 0.0)


# ---- judge: the node failing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"), [(502, "http_502"), (503, "busy"), (504, "http_504"), (429, "busy")]
)
def test_gateway_and_busy_statuses_fail_over(status, reason):
    a = judge(3, head(status), 40.0, NOW)
    assert a == Attempt(3, "failover", reason, status, 40.0, None)
    assert a.node_failed


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retry_after_seconds_is_kept_where_the_rule_reads_it(status):
    assert judge(1, head(status, retry_after="45"), 1.0, NOW).retry_after_s == 45.0


def test_429_with_retry_after_http_date():
    a = judge(1, head(429, retry_after=http_date(NOW + 120)), 1.0, NOW)
    assert (a.outcome, a.reason) == ("failover", "busy")
    assert a.retry_after_s == pytest.approx(120, abs=1)


def test_retry_after_date_is_measured_from_the_now_given():
    a = judge(1, head(503, retry_after=http_date(NOW + 600)), 1.0, NOW + 100)
    assert a.retry_after_s == pytest.approx(500, abs=1)


@pytest.mark.parametrize("status", [520, 521, 522, 523, 524, 525, 526, 530])
def test_cloudflare_origin_errors_are_tunnel_down(status):
    assert judge(7, head(status), 3.0, NOW) == Attempt(7, "failover", "tunnel_down", status, 3.0)


def test_tunnel_down_carries_no_retry_after():
    assert judge(1, head(530, retry_after="100"), 1.0, NOW).retry_after_s is None


@pytest.mark.parametrize("status", [200, 404, 429, 502, 503, 530])
def test_ngrok_error_code_header_means_tunnel_offline(status):
    a = judge(4, head(status, ngrok="ERR_NGROK_3200", retry_after="9"), 2.0, NOW)
    assert a == Attempt(4, "failover", "tunnel_offline", status, 2.0, None)


def test_empty_ngrok_error_code_is_ignored():
    assert judge(1, head(200, ngrok=""), 1.0, NOW).outcome == "pass"


@given(
    st.integers(100, 999),
    st.one_of(st.none(), st.text(max_size=10)),
    st.one_of(st.none(), st.text(max_size=20)),
    st.floats(0, 1e6),
)
@settings(max_examples=300, deadline=None)
def test_judge_never_raises_and_keeps_the_head(status, ngrok, retry_after, ms):
    a = judge(6, head(status, ngrok, retry_after), ms, NOW)
    assert (a.node, a.status, a.ms) == (6, status, ms)
    assert a.outcome in ("pass", "failover")
    if a.outcome == "pass":
        assert a.reason == "ok" and a.retry_after_s is None
        assert not ngrok and status not in (429, 502, 503, 504, *range(520, 527), 530)
    if a.retry_after_s is not None:
        assert status in (429, 502, 503, 504) and not ngrok
        assert 1.0 <= a.retry_after_s <= MAX_RETRY_AFTER_S


# ---- no response -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["timeout", "refused", "error"])
def test_no_response_always_fails_over(kind):
    a = no_response(8, kind, 99.5)
    assert a == Attempt(8, "failover", kind, None, 99.5, None)
    assert a.node_failed


# ---- Attempt ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "failed"), [("pass", False), ("failover", True), ("cut", True), ("gone", False)]
)
def test_only_failover_and_cut_count_against_the_node(outcome, failed):
    assert Attempt(1, outcome, "x").node_failed is failed


def test_attempt_public_has_no_timing_or_url():
    a = Attempt(3, "failover", "http_502", status=502, ms=12.5, retry_after_s=9.0)
    assert a.public() == {"node": 3, "reason": "http_502", "status": 502}
    assert Attempt(4, "failover", "refused").public() == {"node": 4, "reason": "refused"}


def test_attempt_log_line():
    a = Attempt(3, "failover", "busy", status=503, ms=12.5, retry_after_s=9.0)
    assert a.log() == {
        "node": 3,
        "outcome": "failover",
        "reason": "busy",
        "status": 503,
        "ms": 12.5,
    }
    assert Attempt(2, "gone", "client_gone").log() == {
        "node": 2,
        "outcome": "gone",
        "reason": "client_gone",
        "status": None,
        "ms": None,
    }


# ---- Retry-After -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 7 ", 7.0),
        ("120", 120.0),
        ("3600", 3600.0),
        ("3601", MAX_RETRY_AFTER_S),
        ("99999999999999999999", MAX_RETRY_AFTER_S),
        ("0", 1.0),  # at least a second
        ("000", 1.0),
    ],
)
def test_retry_after_seconds(value, seconds):
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize("value", [None, "", "   "])
def test_retry_after_absent(value):
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize(
    "value",
    ["-5", "1.5", "soon", "5 seconds", "0x10", "Wed, 99 Foo 2023", "²", "¹²", "٣", "1e3"],
)
def test_retry_after_garbage_is_none(value):
    assert parse_retry_after(value, NOW) is None


def test_retry_after_http_date_future():
    assert parse_retry_after(http_date(NOW + 300), NOW) == pytest.approx(300, abs=1)


def test_retry_after_http_date_past_or_now_is_one_second():
    assert parse_retry_after(http_date(NOW - 300), NOW) == 1.0
    assert parse_retry_after(http_date(NOW), NOW) == 1.0


def test_retry_after_http_date_far_future_is_capped():
    assert parse_retry_after(http_date(NOW + 10 * 86400), NOW) == MAX_RETRY_AFTER_S


def test_retry_after_obsolete_date_formats():
    # RFC 850 and asctime forms are still valid HTTP-dates (RFC 9110 §5.6.7)
    rfc850 = "Tuesday, 14-Nov-23 22:15:00 GMT"
    expected = email.utils.parsedate_to_datetime(rfc850).timestamp() - (NOW - 3600)
    got = parse_retry_after(rfc850, NOW - 3600)
    assert got == pytest.approx(min(max(expected, 1), MAX_RETRY_AFTER_S), abs=1)


def test_retry_after_date_without_zone_is_ignored():
    # "-0000" means "no zone information": not trusted as a time
    assert parse_retry_after("Tue, 14 Nov 2023 22:15:00 -0000", NOW) is None


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_retry_after_never_raises_and_is_bounded(value):
    got = parse_retry_after(value, NOW)
    assert got is None or 1.0 <= got <= MAX_RETRY_AFTER_S


@given(st.integers(0, 10**12))
@settings(max_examples=100, deadline=None)
def test_retry_after_integers(n):
    assert parse_retry_after(str(n), NOW) == min(max(float(n), 1.0), MAX_RETRY_AFTER_S)
