"""heady_shared.devvars: `.dev.vars` read the way wrangler reads it."""

from __future__ import annotations

import pytest

from heady_shared.devvars import DevVarsError, parse_dev_vars

# ---- .dev.vars -------------------------------------------------------------------------------
# Expected values are what wrangler reads (dotenv 16.3.1's parse, bundled in wrangler 4.164.0:
# node_modules/wrangler/wrangler-dist/cli.js), checked by running it on each line.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1", {"A": "1"}),
        ("export A=1", {"A": "1"}),
        ("  A = 1  ", {"A": "1"}),
        ("A=", {"A": ""}),
        ('A=""', {"A": ""}),
        ('A="x y"', {"A": "x y"}),
        ("A='x y'", {"A": "x y"}),
        ('A = "q" ', {"A": "q"}),
        ("A=x # note", {"A": "x"}),
        ('A="a\\nb"', {"A": "a\nb"}),  # \n expands in double quotes ...
        ("A='a\\nb'", {"A": "a\\nb"}),  # ... and only there
        ('A="unterminated', {"A": '"unterminated'}),
        ('A="x"y"', {"A": 'x"y'}),
        ("A=x\nA=y", {"A": "y"}),  # the later line wins
        ("# comment\n\n  # indented\nB=2\n", {"B": "2"}),
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
        (
            "COLAB_ENDPOINT_1=https://a.ngrok-free.app\nNODE_TOKEN=t0k",
            {"COLAB_ENDPOINT_1": "https://a.ngrok-free.app", "NODE_TOKEN": "t0k"},
        ),
    ],
)
def test_dev_vars_lines(text, expected):
    assert parse_dev_vars(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a quoted value followed by a comment: wrangler reads the value without quotes, so
        # `COLAB_ENDPOINT_1="https://..."  # node 1` is a valid endpoint under `wrangler dev`
        ('A="v" # note', {"A": "v"}),
        ("A='v' # note", {"A": "v"}),
        (
            'COLAB_ENDPOINT_1="https://a.example"  # node 1',
            {"COLAB_ENDPOINT_1": "https://a.example"},
        ),
    ],
)
def test_dev_vars_quoted_value_with_a_comment(text, expected):
    assert parse_dev_vars(text) == expected


@pytest.mark.parametrize("line", ["not a setting", "1A=x", "A B=x", "=x", "NODE_TOKEN"])
def test_dev_vars_bad_line_names_the_line_and_quotes_only_its_start(line):
    text = "A=1\n" + line + "  \n"
    with pytest.raises(DevVarsError, match=r"\.dev\.vars line 2 is not KEY=value") as err:
        parse_dev_vars(text)
    assert repr(line.strip()[:12]) in str(err.value)


def test_dev_vars_error_does_not_quote_a_pasted_secret_url():
    with pytest.raises(DevVarsError) as err:
        parse_dev_vars("https://secret-tunnel-name.ngrok-free.app")
    assert "secret-tunnel-name" not in str(err.value)
