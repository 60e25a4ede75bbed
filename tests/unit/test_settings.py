"""settings.py is the one declaration of every setting: wrangler.toml's [vars] and the table
in docs/configuration.md must say what it says, and load_config must honour its bounds."""

import tomllib
from pathlib import Path

import pytest

import settings
from config import load_config

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def test_wrangler_vars_are_the_declared_defaults():
    vars_ = tomllib.loads((ROOT / "wrangler.toml").read_text())["vars"]
    assert vars_ == settings.wrangler_vars()


def test_docs_table_is_generated_from_the_declaration():
    text = (ROOT / "docs" / "configuration.md").read_text()
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == settings.docs_table().strip(), (
        "docs/configuration.md is stale; paste:\n" + settings.docs_table()
    )


def test_no_secret_has_a_default_or_sits_in_wrangler_toml():
    for s in settings.SETTINGS:
        if s.kind == "secret":
            assert s.default is None and not s.in_wrangler, s.name


NUMBERS = [s for s in settings.SETTINGS if s.kind == "number"]


@pytest.mark.parametrize("spec", NUMBERS, ids=lambda s: s.name)
def test_every_number_falls_back_to_its_default_outside_its_bounds(spec):
    for bad in (str(spec.hi * 2 + 1), str(spec.lo - 1), "nan", "abc"):
        cfg = load_config({spec.name: bad})
        assert any(p.startswith(spec.name + ":") for p in cfg.problems), (spec.name, bad)
    for good in (spec.lo, spec.hi):
        problems = load_config({spec.name: str(good)}).problems
        assert not [p for p in problems if p.startswith(spec.name + ":")], (spec.name, good)
