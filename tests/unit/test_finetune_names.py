"""heady_shared.ftnames: OpenAI's `ft:` names and the safe slug nodes and gateway share."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from heady_shared import ftnames
from heady_shared.ftnames import (
    MAX_STEP,
    FtName,
    checkpoint_name,
    checkpoint_of_slug,
    ft_base,
    ft_model_name,
    is_slug,
    parse,
    slug,
)

BASE = "Qwen/Qwen2.5-1.5B-Instruct"
JOB = "0123456789abcdef01234567"


def test_names_as_openai_forms_them() -> None:
    name = ft_model_name(BASE, "heady", JOB)
    assert name == f"ft:{BASE}:heady:heady:{JOB}"
    assert ft_model_name(BASE, None, JOB) == f"ft:{BASE}:heady::{JOB}"
    assert checkpoint_name(name, 88) == f"{name}:ckpt-step-88"
    assert ft_base(name) == ft_base(checkpoint_name(name, 88)) == BASE
    assert ft_base(ft_model_name(BASE, None, JOB)) == BASE
    for not_ft in (BASE, "ft:", "ft:a:b:c", "ft::heady:s:id", "ft:a:heady:s:", "ft:a:b:c:d:e"):
        assert ft_base(not_ft) is None, not_ft


def test_a_slug_is_readable_and_safe() -> None:
    s = slug(ft_model_name(BASE, "heady", JOB))
    digest = hashlib.sha256(ft_model_name(BASE, "heady", JOB).encode()).hexdigest()[:20]
    assert s == f"ft-Qwen_Qwen2_5-1_5B-Instruct_heady_heady_0-{digest}"
    assert len(s) <= ftnames.SLUG_MAX and is_slug(s)
    assert slug("ft:../../etc:heady::x").startswith("ft-_etc_heady_x-")


@given(st.text(max_size=400))
def test_any_name_gives_a_safe_deterministic_slug(name: str) -> None:
    s = slug(name)
    assert s == slug(name)
    assert len(s) <= 64 and is_slug(s)
    assert "/" not in s and ":" not in s and ".." not in s and "\\" not in s
    assert s.isascii() and s.isprintable() and not s.startswith(".")


@given(st.lists(st.text(max_size=80), min_size=2, max_size=30, unique=True))
def test_different_names_never_share_a_slug(names: list[str]) -> None:
    assert len({slug(n) for n in names}) == len(names)


def test_names_differing_only_in_unsafe_characters_get_different_slugs() -> None:
    a, b = ft_model_name("org/m", "x", JOB), ft_model_name("org_m", "x", JOB)
    assert slug(a) != slug(b)
    assert slug(a)[:-21] == slug(b)[:-21]  # same readable part: the digest tells them apart


def test_is_slug_refuses_what_slug_never_makes() -> None:
    good = slug(ft_model_name(BASE, "s", JOB))
    for bad in ("", "..", "../x", good + "/x", good.upper(), "ft-a-" + "0" * 19, "x" + good,
                good + "0", "ft-" + "a" * 41 + "-" + "0" * 20):  # fmt: skip
        assert not is_slug(bad), bad


def test_a_checkpoint_name_parses_to_its_job_model_and_step() -> None:
    model = ft_model_name(BASE, "heady", JOB)
    ckpt = checkpoint_name(model, 88)
    assert parse(ckpt) == FtName(BASE, "heady", "heady", JOB, 88)
    assert parse(ckpt).model == model and str(parse(ckpt)) == ckpt
    assert parse(model) == FtName(BASE, "heady", "heady", JOB, None)
    assert parse(checkpoint_name(ft_model_name(BASE, None, JOB), 0)).suffix == ""
    assert parse(checkpoint_name(model, MAX_STEP)).step == MAX_STEP
    bad_steps = ("01", "", "1e3", "-1", "+1", " 1", str(MAX_STEP + 1), "\u0661", "1 ")
    for bad in [*(f"ckpt-step-{b}" for b in bad_steps), "step-1", "ckpt-1"]:
        assert parse(f"{model}:{bad}") is None and ft_base(f"{model}:{bad}") is None, bad


_field = st.text(st.characters(blacklist_characters=":"), min_size=1, max_size=40)


@given(
    _field,
    _field,
    st.text(st.characters(blacklist_characters=":"), max_size=64),
    _field,
    st.none() | st.integers(0, MAX_STEP),
)
def test_every_name_round_trips(base, org, suffix, job, step) -> None:
    name = FtName(base, org, suffix, job, step)
    assert parse(str(name)) == name
    assert ft_base(str(name)) == base


_hex = st.text("0123456789abcdef", min_size=1, max_size=24)


@given(_field, st.none() | st.text(st.characters(blacklist_characters=":"), max_size=64),
       _hex, st.integers(0, MAX_STEP))  # fmt: skip
def test_a_checkpoint_slug_gives_back_its_job_and_step(base, suffix, job, step) -> None:
    ckpt = checkpoint_name(ft_model_name(base, suffix, job), step)
    s = slug(ckpt)
    assert is_slug(s) and len(s) <= 64 and s.startswith(f"ft-ckpt-{job}-{step}-")
    assert checkpoint_of_slug(s) == (job, step)
    assert s != slug(ft_model_name(base, suffix, job))  # never the job's model's slug


def test_only_checkpoint_slugs_have_the_checkpoint_form() -> None:
    model = ft_model_name(BASE, "heady", JOB)
    assert checkpoint_of_slug(slug(model)) is None
    assert checkpoint_of_slug(slug(checkpoint_name(model, 12))) == (JOB, 12)
    # An id that is no job hex keeps the general form (no job of ours has it).
    odd = checkpoint_name(ft_model_name(BASE, "s", "XYZ"), 3)
    assert is_slug(slug(odd)) and checkpoint_of_slug(slug(odd)) is None
    # The form alone proves nothing: a model whose base starts with `ckpt-` can have it, so
    # the gateway compares slug() of the checkpoint it finds with the slug it was asked for.
    lookalike = ft_model_name(f"ckpt-{JOB}-1234567890", "x", JOB)
    assert checkpoint_of_slug(slug(lookalike)) == (JOB, 1234567890)
    assert slug(lookalike) != slug(checkpoint_name(ft_model_name(BASE, "x", JOB), 1234567890))
    for bad in ("ft-ckpt-" + JOB + "-01-" + "0" * 20, "ft-ckpt-" + JOB.upper() + "-1-" + "0" * 20,
                "ft-ckpt--1-" + "0" * 20, "ft-ckpt-" + "a" * 25 + "-1-" + "0" * 20):  # fmt: skip
        assert checkpoint_of_slug(bad) is None, bad
