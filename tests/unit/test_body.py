"""body.py: Content-Length per RFC 9110, whose fault a body failure is, key-bearing query params."""

from __future__ import annotations

import re
from urllib.parse import quote, quote_plus, unquote, unquote_plus

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
    strip_key_params,
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


# ---- strip_key_params -------------------------------------------------------------------

KEYS = ("client-key-0123456789", "other-key")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ""),
        ("a=1", "a=1"),
        ("key=client-key-0123456789", ""),
        ("api_key=other-key&stream=true", "stream=true"),
        ("a=1&k=client-key-0123456789&b=2", "a=1&b=2"),
        ("a=1&k=other-key&k2=client-key-0123456789", "a=1"),
        ("client-key-0123456789", ""),  # the key alone, no name
        ("k=client%2Dkey%2D0123456789", ""),  # percent-encoded
        ("k=other+key", "k=other+key"),  # "+" is a space: "other key" is not a key
        ("k=client-key-012345678", "k=client-key-012345678"),  # a prefix is not the key
        ("k=client-key-01234567890", "k=client-key-01234567890"),
        ("k=", "k="),
        ("=client-key-0123456789", ""),
        ("a=%20x&&b=%zz", "a=%20x&&b=%zz"),  # others keep their exact bytes, even odd ones
        ("client-key-0123456789=1", "client-key-0123456789=1"),  # a name is not a value
    ],
)
def test_strip_key_params(query, expected):
    assert strip_key_params(query, KEYS) == expected


def test_plus_as_space_is_also_compared():
    assert strip_key_params("k=my+key&x=1", ("my key",)) == "x=1"


def test_no_keys_keeps_the_query():
    assert strip_key_params("k=client-key-0123456789", ()) == "k=client-key-0123456789"
    assert strip_key_params("k=", ("",)) == "k="


key_text = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=20)
param = st.tuples(st.text(st.characters(min_codepoint=97, max_codepoint=122), max_size=5), key_text)


@given(st.lists(param, max_size=6), st.lists(key_text, min_size=1, max_size=3), st.data())
@settings(max_examples=300, deadline=None)
def test_no_key_survives_in_any_encoding(params, keys, data):
    """Whatever the mix and encoding, no value equal to a key is left, and every other
    parameter is kept exactly, in order. (A value counts as a key when any reading of it is
    one: as sent, percent-decoded, or with "+" as a space.)"""
    parts = []
    expect = []
    for name, value in params:
        is_key = data.draw(st.booleans())
        value = data.draw(st.sampled_from(keys)) if is_key else value
        enc = data.draw(st.sampled_from([quote, quote_plus]))
        part = f"{name}={enc(value, safe='')}"
        parts.append(part)
        raw = part.partition("=")[2]
        if not {raw, unquote(raw), unquote_plus(raw)} & set(keys):
            expect.append(part)
        else:
            assert value in keys or raw in keys or unquote(raw) in keys
    assert strip_key_params("&".join(parts), keys) == "&".join(expect)
