"""body.py: Content-Length per RFC 9110, whose fault a body failure is."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from body import (
    BAD_BODY,
    TOO_LARGE,
    BodyError,
    body_error,
    content_length,
    read_fault,
    short_body_fault,
)

LIMIT = 65536

# ---- content_length --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "length"),
    [("0", 0), ("1", 1), ("200", 200), (str(LIMIT), LIMIT), ("007", 7), (" 12", 12), ("12\t", 12)],
)
def test_valid_lengths(raw, length):
    assert content_length(raw, LIMIT) == length


def test_absent_is_none():
    assert content_length(None, LIMIT) is None


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        "-1",
        "-0",
        "+21",
        "1,1",
        "3, 3",
        "1 2",
        "0x10",
        "1e3",
        "1.0",
        "²",
        "١٢",  # Arabic-Indic digits: str.isdigit() says yes, RFC 9110 says DIGIT is 0-9
        "12a",
        "\n12",
        "1_000",
    ],
)
def test_invalid_lengths_are_400(raw):
    err = content_length(raw, LIMIT)
    assert err == BodyError(400, BAD_BODY, "invalid Content-Length: must be digits only")


@pytest.mark.parametrize(
    "raw", [str(LIMIT + 1), "99999999999999999999", "9" * 5000, "1" + "0" * 20]
)
def test_too_large_is_413(raw):
    err = content_length(raw, LIMIT)
    assert isinstance(err, BodyError) and (err.status, err.type) == (413, TOO_LARGE)
    assert str(LIMIT) in err.message


def test_leading_zeros_do_not_make_it_too_large():
    assert content_length("0" * 5000 + "5", LIMIT) == 5


@given(st.text(max_size=30), st.integers(0, 10**12))
@settings(max_examples=500, deadline=None)
def test_content_length_total(raw, limit):
    """Every string gets exactly one verdict, and it agrees with the grammar 1*DIGIT."""
    got = content_length(raw, limit)
    text = raw.strip(" \t")
    if re.fullmatch(r"[0-9]+", text):
        if int(text) <= limit:
            assert got == int(text)
        else:
            assert isinstance(got, BodyError) and got.status == 413
    else:
        assert isinstance(got, BodyError) and got.status == 400 and got.type == BAD_BODY


@given(st.integers(0, 10**15))
def test_digits_round_trip(n):
    assert content_length(str(n), 10**15) == n


# ---- read_fault / short_body_fault ----------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "fault"),
    [
        # As measured on workerd 1.20241106.2 (str() of the JsException), docs/client-faults.md
        ("Error: Network connection lost.", "truncated"),
        ("Error: internal error", "malformed"),
        ("TypeError: Can't read from request stream because client disconnected.", "client_gone"),
        ("Error: something nobody has seen yet", "unreadable"),
        ("", "unreadable"),
    ],
)
def test_read_fault_is_the_clients(message, fault):
    assert read_fault(message) == fault


@pytest.mark.parametrize(
    "message",
    [
        "TypeError: Can't read from request stream after response has been sent.",
        "TypeError: Can't read from request stream after responding with an exception.",
        "TypeError: This ReadableStream is disturbed (has already been read from), and cannot "
        "be used as a body.",
        "TypeError: This ReadableStream is currently locked to a reader.",
    ],
)
def test_read_fault_of_our_own_misuse_is_not_the_clients(message):
    assert read_fault(message) is None


@pytest.mark.parametrize(
    ("declared", "received", "fault"),
    [
        (200, 100, "truncated"),
        (200, 0, "truncated"),
        (200, 200, None),
        (None, 7, None),
        (0, 0, None),
    ],
)
def test_short_body_fault(declared, received, fault):
    assert short_body_fault(declared, received) == fault


@pytest.mark.parametrize("fault", ["truncated", "malformed", "client_gone", "unreadable"])
def test_body_error_is_400_bad_request_body(fault):
    err = body_error(fault)
    assert (err.status, err.type) == (400, BAD_BODY)
    assert err.message and "internal" not in err.message
