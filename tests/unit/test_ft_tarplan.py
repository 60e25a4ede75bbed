"""tarplan: the wanted members of a stored tar, served as byte ranges of it, make a tar that
Python's tarfile and heady_node's LoRA resolver (`unpack`) read as exactly those members."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import finetune
from heady_node.finetune.adapter import CONFIG, WEIGHTS, pack_dir
from heady_node.finetune.resolver import ADAPTER_FILES, unpack
from heady_node.finetune.runner import STATE  # the trainer's file in a checkpoint
from tarplan import BLOCK, MAX_HEADERS, TarError, member_ranges, parse_pax
from tests.support.stores import drive

WANTED = finetune.ADAPTER_FILES  # what the gateway serves of a checkpoint


def test_the_gateway_serves_the_files_the_resolver_takes() -> None:
    assert set(WANTED) == ADAPTER_FILES == {CONFIG, WEIGHTS}


FORMATS = (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT)


def make_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT, **info) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=fmt) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            for k, v in info.items():
                setattr(ti, k, v)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def plan(data: bytes, wanted=WANTED) -> list[tuple[int, int]]:
    async def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return drive(member_ranges(read, len(data), wanted))


def served(data: bytes, wanted=WANTED) -> bytes:
    return b"".join(data[o : o + n] for o, n in plan(data, wanted))


def members(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_a_checkpoint_as_the_runner_packs_it_serves_the_adapter_only(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt-step-6"
    ckpt.mkdir()
    files = {CONFIG: b'{"r": 8}', WEIGHTS: b"\x01" * 1500, STATE: b'{"step": 6}'}
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
    data = pack_dir(ckpt, (CONFIG, WEIGHTS, STATE))  # what runner._checkpoint uploads
    out = served(data)
    assert members(out) == {CONFIG: files[CONFIG], WEIGHTS: files[WEIGHTS]}
    assert out.endswith(bytes(2 * BLOCK)) and len(out) % BLOCK == 0
    assert len(out) < len(data)
    unpack(out, tmp_path / "adapter")  # the resolver's own check: exactly the adapter files
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(WANTED)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pax_and_gnu_extended_headers_travel_with_their_member(fmt: int) -> None:
    long = "d/" + "n" * 120  # a name over 100 bytes: a pax `path` or a GNU `L` header
    ckpt = [(STATE, b"s"), (long, b"x" * 700), (CONFIG, b"{}"), (WEIGHTS, b"w" * 513)]
    extra = {} if fmt == tarfile.USTAR_FORMAT else {"mtime": 1.5, "uname": "é" * 40}
    if fmt == tarfile.USTAR_FORMAT:
        ckpt[1] = ("d/" + "n" * 90, b"x" * 700)  # ustar: prefix + name, no extended header
    data = make_tar(ckpt, fmt, **extra)
    assert members(served(data)) == {CONFIG: b"{}", WEIGHTS: b"w" * 513}
    assert members(served(data, (ckpt[1][0], STATE))) == {ckpt[1][0]: b"x" * 700, STATE: b"s"}


names = st.sampled_from([CONFIG, WEIGHTS, STATE, "optimizer.pt", "a/b.txt", "x" * 130])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(names, st.binary(max_size=1200)), max_size=6, unique_by=lambda m: m[0]),
    st.sampled_from(FORMATS),
    st.sampled_from([0, 1.25]),
)
def test_any_archive_gives_exactly_the_wanted_members_or_refuses(member_list, fmt, mtime):
    if fmt == tarfile.USTAR_FORMAT:
        member_list = [m for m in member_list if len(m[0]) <= 100]
    data = make_tar(member_list, fmt, mtime=mtime if fmt != tarfile.USTAR_FORMAT else 0)
    have = dict(member_list)
    if not set(WANTED) <= set(have):
        with pytest.raises(TarError, match="holds no"):
            plan(data)
        return
    assert members(served(data)) == {n: have[n] for n in WANTED}


def _tar_with(extra: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name, body in ((CONFIG, b"{}"), (WEIGHTS, b"w")):
            ti = tarfile.TarInfo(name)
            ti.size = len(body)
            tar.addfile(ti, io.BytesIO(body))
        tar.addfile(extra, io.BytesIO(data) if extra.isfile() else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size = kind, size
    if kind == tarfile.SYMTYPE:
        ti.linkname = "/etc/passwd"
    return ti


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (make_tar([(CONFIG, b"{}")]), "holds no adapter_model.safetensors"),
        (make_tar([(CONFIG, b"{}"), (WEIGHTS, b"w"), (CONFIG, b"x")]), "appears twice"),
        (_tar_with(_info(CONFIG, tarfile.SYMTYPE)), "not a regular file"),
        (make_tar([(CONFIG, b"{}"), (WEIGHTS, b"w")])[: 4 * BLOCK], "no end-of-archive"),
        (make_tar([(CONFIG, b"{}"), (WEIGHTS, b"w" * 5000)])[: 4 * BLOCK], "past the archive"),
        (b"{}" + bytes(3 * BLOCK), "not a ustar header"),
        (bytes(4 * BLOCK), "holds no"),
        (make_tar([(f"f{i}", b"") for i in range(MAX_HEADERS)]), "more than"),
    ],
)
def test_what_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(TarError, match=why):
        plan(data)


def test_a_corrupt_header_or_a_global_header_is_refused() -> None:
    good = bytearray(make_tar([(CONFIG, b"{}"), (WEIGHTS, b"w")], tarfile.USTAR_FORMAT))
    good[2 * BLOCK + 124] = ord("7")  # the second header's size: checksum no longer matches
    with pytest.raises(TarError, match="checksum"):
        plan(bytes(good))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", pax_headers={"comment": "all"}) as tar:
        for name in WANTED:
            tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    with pytest.raises(TarError, match="global"):
        plan(buf.getvalue())


def test_pax_records_parse_and_bad_ones_are_refused() -> None:
    assert parse_pax(b"14 path=a/b/c\n10 size=7\n" + bytes(5)) == {"path": "a/b/c", "size": "7"}
    for bad in (b"99 path=x\n", b"x path=a\n", b"9 pathx\n\n", b"8 path=a", b"3 \n"):
        with pytest.raises(TarError):
            parse_pax(bad)
