"""settings.py is the one declaration of every setting: wrangler.toml's [vars] and the table
in docs/configuration.md must say what it says, config's dataclasses default to what it
declares, every row fills one config field, and load_config honours every declared bound."""

import dataclasses
import operator
import tomllib
import typing
from pathlib import Path

import pytest

import settings
from config import GatewayConfig, HealthPolicy, Timeouts, load_config
from finetune import FtSettings
from heady_shared.routes import NODE_NUMBERS
from jobdb import BatchSettings

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
    secrets = [s for s in settings.SETTINGS if s.secret]
    assert {s.name for s in secrets} >= {"GATEWAY_API_KEYS", "NODE_TOKEN", "COLAB_ENDPOINT_1"}
    for s in secrets:
        assert s.default is None and not s.in_wrangler, s.name


def test_every_kind_has_one_parser():
    assert set(settings.PARSERS) == set(typing.get_args(settings.Kind))


def test_every_config_field_is_filled_by_exactly_one_setting():
    # built by load_config itself
    own = {"nodes", "timeouts", "health", "batch", "finetune", "problems", "fatal"}
    fields = [f"nodes.{n}" for n in NODE_NUMBERS]
    fields += [f.name for f in dataclasses.fields(GatewayConfig) if f.name not in own]
    fields += [f"timeouts.{f.name}" for f in dataclasses.fields(Timeouts)]
    fields += [f"health.{f.name}" for f in dataclasses.fields(HealthPolicy)]
    fields += [f"batch.{f.name}" for f in dataclasses.fields(BatchSettings)]
    ft = [f.name for f in dataclasses.fields(FtSettings) if f.name != "max_events"]
    fields += [f"finetune.{name}" for name in ft]  # max_events: a constant, not a setting
    assert sorted(s.into for s in settings.SETTINGS) == sorted(fields)


def test_an_unset_setting_is_its_declared_default_and_so_is_each_dataclass_default():
    cfg = load_config({})
    assert cfg.timeouts == Timeouts() and cfg.health == HealthPolicy()
    assert cfg.batch == BatchSettings() and cfg.finetune == FtSettings()
    for s in settings.SETTINGS:
        if not s.into.startswith("nodes."):
            assert operator.attrgetter(s.into)(cfg) == settings.DEFAULTS[s.name], s.name
    # the [vars] wrangler.toml carries change nothing: they are the defaults, read cleanly
    assert load_config(settings.wrangler_vars()) == cfg


BOUNDED = [s for s in settings.SETTINGS if s.kind in ("number", "integer")]


@pytest.mark.parametrize("spec", BOUNDED, ids=lambda s: s.name)
def test_every_number_honours_its_declared_bounds(spec):
    """Within lo..hi: used as given. Outside, or not a number: the default and one problem
    naming the setting. Blank: the default, silently."""
    value_of = operator.attrgetter(spec.into)
    default = settings.DEFAULTS[spec.name]
    # the cap may not sit below the base, nor the heartbeat above the lease
    room = {"COOLDOWN_BASE_S": "1", "COOLDOWN_MAX_S": "86400"}
    room |= {"BATCH_HEARTBEAT_S": "0.2", "BATCH_LEASE_S": "3600"}
    room |= {"FT_HEARTBEAT_S": "0.2", "FT_LEASE_S": "3600"}
    for good in (spec.lo, spec.hi):
        cfg = load_config({**room, spec.name: f" {good} "})
        assert value_of(cfg) == good and cfg.problems == (), good
    below = spec.lo - 1 if spec.lo >= 1 else spec.lo - 0.25
    for bad in (below, spec.hi + 1, spec.hi * 2 + 1, -5, "1e999", "nan", "inf"):
        cfg = load_config({**room, spec.name: str(bad)})
        assert value_of(cfg) == default, bad
        (problem,) = cfg.problems
        assert problem.startswith(f"{spec.name}:") and "outside" in problem and "using" in problem
    for raw in ("ten", "abc"):
        cfg = load_config({**room, spec.name: raw})
        assert value_of(cfg) == default
        (problem,) = cfg.problems
        assert problem.startswith(f"{spec.name}:") and f"{raw!r} is not a number" in problem
    cfg = load_config({**room, spec.name: "  "})
    assert value_of(cfg) == default and cfg.problems == ()


def test_a_heartbeat_not_below_the_lease_is_a_third_of_it():
    cfg = load_config({"BATCH_LEASE_S": "30", "BATCH_HEARTBEAT_S": "30"})
    assert cfg.batch.lease_s == 30 and cfg.batch.heartbeat_s == 10
    assert len(cfg.problems) == 1 and "BATCH_HEARTBEAT_S" in cfg.problems[0]
