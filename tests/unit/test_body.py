"""body.py: Content-Length per RFC 9110, whose fault a body failure is."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from body import (
    BAD_BODY,
    FIRST_READ_BYTES,
    TOO_LARGE,
    BodyError,
    body_error,
    content_length,
    next_read_size,
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


# ---- how a body is read: next_read_size ---------------------------------------------------


def _reads(size: int, declared: int | None, limit: int) -> list[int]:
    """The read sizes asked for while a body of `size` bytes arrives (each read filled)."""
    out, total = [], 0
    while (n := next_read_size(total, declared, limit)) > 0:
        out.append(n)
        got = min(n, size - total)
        total += got
        if got < n:
            break
    return out


def test_a_small_declared_body_is_one_read_of_its_length():
    assert _reads(300, 300, 10 << 20) == [300]
    assert _reads(0, 0, 10 << 20) == []


def test_a_big_declared_body_takes_a_few_growing_reads_ending_at_its_length():
    reads = _reads(10 << 20, 10 << 20, 10 << 20)
    assert sum(reads) == 10 << 20 and len(reads) <= 10
    assert reads[0] == FIRST_READ_BYTES


def test_an_undeclared_body_is_read_to_one_byte_past_the_limit():
    limit = 1 << 20
    reads = _reads(5 << 20, None, limit)  # an endless upload
    assert sum(reads) == limit + 1  # enough to know it is over the limit, no more
    assert _reads(1000, None, limit) == [FIRST_READ_BYTES]  # a short one: one read, EOF


@given(st.integers(0, 1 << 24), st.integers(0, 1 << 24), st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_read_never_asks_for_more_than_has_come_or_past_the_end(total, limit, declare):
    declared = min(limit, total + 12345) if declare else None
    n = next_read_size(total, declared, limit)
    end = declared if declared is not None else limit + 1
    assert 0 <= n <= max(0, end - total)
    assert n <= max(FIRST_READ_BYTES, total)  # memory ahead of the bytes: bounded by them
    assert (n == 0) == (total >= end)
