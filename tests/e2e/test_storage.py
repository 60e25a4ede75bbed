"""The storage seam in the real runtime: jsstore's R2 (FILES) and D1 (JOBS_DB) adapters, as
wrangler.toml declares them, through the harness's test-only routes (harness_main.py).

A 3 MiB upload streamed into R2 without entering Python; ranged reads into Python and as a
JS stream; several ranges as one response body; size and delete; a D1 batch (one
transaction), run, and all with RETURNING."""

from __future__ import annotations

import httpx

from harness.gateway import Gateway

SIZE = 3 * 1024 * 1024
DATA = b"".join(f"{i:08d}\n".encode() for i in range(SIZE // 9 + 1))[:SIZE]


def chunks(size: int = 64 * 1024):
    for start in range(0, len(DATA), size):
        yield DATA[start : start + size]


def test_r2_and_d1_adapters(gateway: Gateway):
    key = "e2e/storage-3mib.txt"
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        put = http.post(
            "/__harness/blob",
            params={"key": key},
            content=chunks(),  # streamed by the client; the Worker pipes it into R2
            headers={"content-length": str(SIZE)},
        )
        assert put.status_code == 200, put.text
        assert put.json() == {"stored": SIZE}

        # one ranged read, as a JS stream
        r = http.get("/__harness/blob", params={"part": f"{key}:1048570:20"})
        assert r.status_code == 200 and r.content == DATA[1048570:1048590]

        # several ranges as one body, the last running to the object's end
        parts = [(0, 9), (SIZE - 100, 100), (2_000_000, 70_000), (17, 1)]
        r = http.get("/__harness/blob", params={"part": [f"{key}:{o}:{n}" for o, n in parts]})
        assert r.status_code == 200
        assert r.headers["content-length"] == str(sum(n for _, n in parts))
        assert r.content == b"".join(DATA[o : o + n] for o, n in parts)

        # a missing part ends the body short: the client's read fails, never a clean end
        bad = [f"{key}:0:9", f"{key}.none:0:5"]
        try:
            r = http.get("/__harness/blob", params={"part": bad})
            cut = len(r.content) < 14
        except httpx.HTTPError:
            cut = True
        assert cut

        got = http.post("/__harness/storage", params={"key": key})
        assert got.status_code == 200, got.text
        out = got.json()

    assert out["size"] == SIZE
    assert out["first"] == DATA[:16].decode()
    assert out["middle"] == DATA[1_000_000:1_000_032].decode()
    assert out["last"] == DATA[-10:].decode()
    assert out["empty"] == ""
    assert out["missing"] == [None, None]
    assert out["put_bytes"] == 7 and out["bytes_back"] == list(b"\x00\xffbytes")
    assert out["put_str"] == len("café".encode())
    assert out["after_delete"] == [None, None, None]
    assert out["listed"] == [[[key, key + ".b"], True], [[key + ".s"], False]]

    assert out["batch"] == [1, 1, 2]
    assert out["returning"] == [{"id": "a", "n": 11, "note": None}]
    assert out["atomic"] is True
    assert out["deleted"] == 1
    assert out["rows"] == [{"id": "a", "state": "running", "n": 11, "note": None}]
    assert out["blob_param"] == [{"n": 3, "is_null": 1}]
