"""attempt.py: response/error classification, Retry-After, next_step, Attempt.public."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attempt import (
    MAX_RETRY_AFTER_S,
    Attempt,
    Verdict,
    classify_error,
    classify_response,
    error_kind,
    next_step,
    parse_retry_after,
)

NOW = 1_700_000_000.0


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


@pytest.mark.parametrize(
    "status",
    [
        200,
        201,
        204,
        206,
        301,
        302,
        304,
        400,
        401,
        403,
        404,
        405,
        409,
        413,
        422,
        500,
        501,
        505,
        507,
        599,
    ],
)
def test_model_server_answers_pass_through(status):
    v = classify_response(status, None, None, NOW)
    assert v == Verdict("pass", "ok")
    assert not v.node_failed


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500])
def test_pass_through_ignores_retry_after(status):
    assert classify_response(status, None, "30", NOW) == Verdict("pass", "ok", None)


@pytest.mark.parametrize(
    ("status", "reason"), [(502, "http_502"), (503, "busy"), (504, "http_504")]
)
def test_gateway_statuses_fail_over(status, reason):
    v = classify_response(status, None, None, NOW)
    assert v == Verdict("failover", reason, None)
    assert v.node_failed


def test_503_with_retry_after_keeps_it():
    assert classify_response(503, None, "45", NOW) == Verdict("failover", "busy", 45.0)
    assert classify_response(502, None, "45", NOW).retry_after_s == 45.0


def test_429_is_busy_with_retry_after_seconds():
    assert classify_response(429, None, "7", NOW) == Verdict("failover", "busy", 7.0)
    assert classify_response(429, None, None, NOW) == Verdict("failover", "busy", None)


def test_429_with_retry_after_http_date():
    v = classify_response(429, None, http_date(NOW + 120), NOW)
    assert v.outcome == "failover" and v.reason == "busy"
    assert v.retry_after_s == pytest.approx(120, abs=1)


@pytest.mark.parametrize("status", [520, 521, 522, 523, 524, 525, 526, 530])
def test_cloudflare_tunnel_statuses_fail_over(status):
    assert classify_response(status, None, None, NOW) == Verdict("failover", "tunnel_down")


def test_tunnel_down_carries_no_retry_after():
    assert classify_response(530, None, "100", NOW).retry_after_s is None


@pytest.mark.parametrize("status", [200, 404, 429, 502, 503, 530])
def test_ngrok_error_code_header_means_tunnel_offline(status):
    assert classify_response(status, "ERR_NGROK_3200", None, NOW) == Verdict(
        "failover", "tunnel_offline"
    )


def test_empty_ngrok_error_code_is_ignored():
    assert classify_response(200, "", None, NOW) == Verdict("pass", "ok")


@pytest.mark.parametrize("kind", ["timeout", "refused", "error"])
def test_errors_always_fail_over(kind):
    v = classify_error(kind)
    assert v == Verdict("failover", kind)
    assert v.node_failed


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("Network connection lost.", "refused"),
        ("connect ECONNREFUSED 127.0.0.1:9", "refused"),
        ("Connection refused", "refused"),
        ("TypeError: Failed to connect", "refused"),
        ("internal error; reference = abc", "error"),
        ("DNS lookup failed", "error"),
        ("TLS handshake failure", "error"),
        ("", "error"),
    ],
)
def test_error_kind(message, kind):
    assert error_kind(message) == kind


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
    # RFC 850 and asctime forms are still valid HTTP-dates
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


@given(
    st.integers(100, 999),
    st.one_of(st.none(), st.text(max_size=10)),
    st.one_of(st.none(), st.text(max_size=20)),
)
@settings(max_examples=300, deadline=None)
def test_classify_response_never_raises(status, ngrok, retry_after):
    v = classify_response(status, ngrok, retry_after, NOW)
    assert v.outcome in ("pass", "failover")
    if v.outcome == "pass":
        assert v.reason == "ok" and v.retry_after_s is None
    if v.retry_after_s is not None:
        assert status in (429, 502, 503, 504)


# ---- next_step and Attempt -------------------------------------------------------------


@pytest.mark.parametrize(
    ("made", "length", "elapsed", "deadline", "step"),
    [
        (1, 4, 0.0, 900.0, "try"),
        (3, 4, 100.0, 900.0, "try"),
        (4, 4, 0.0, 900.0, "stop"),
        (5, 4, 0.0, 900.0, "stop"),
        (1, 4, 900.0, 900.0, "stop"),
        (1, 4, 901.0, 900.0, "stop"),
        (1, 4, 899.9, 900.0, "try"),
        (0, 0, 0.0, 900.0, "stop"),
    ],
)
def test_next_step(made, length, elapsed, deadline, step):
    assert next_step(made, length, elapsed, deadline) == step


def test_attempt_public_has_no_timing_or_url():
    a = Attempt(3, "failover", "http_502", status=502, ms=12.5, retry_after_s=9.0)
    assert a.public() == {"node": 3, "reason": "http_502", "status": 502}
    assert Attempt(4, "failover", "refused").public() == {"node": 4, "reason": "refused"}
