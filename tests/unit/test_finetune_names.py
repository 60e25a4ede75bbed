"""heady_shared.ftnames: OpenAI's `ft:` names and the safe slug nodes and gateway share."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from heady_shared import ftnames
from heady_shared.ftnames import checkpoint_name, ft_base, ft_model_name, is_slug, slug

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
