"""The operator's status page: one self-contained HTML page served by the Worker.

`GET /` answers the page: HTML, CSS and script inline, nothing fetched from elsewhere. The
script asks for a client key once (kept in the browser's localStorage, never in a URL or in
this page) and polls `GET /api/status` with it. The page holds no data and no secret, so it
is the same bytes for everyone: its ETag and the CSP hashes of its inline style and script
are computed once, at import.

The page is real files beside this module: `page.html` (the document, with `{{name}}` slots),
`page.css` and `page.js` (inlined into it). They reach the Worker as Text modules (the
`[[rules]]` of wrangler.toml, which the offline harness applies too) and are read from the
module's directory like any file. Values the script shares with Python (the poll period, the
failure explanations) are set here only, as `data-*` attributes of `<body>`.

Pure Python (hashlib, base64): runs on CPython 3.12/3.13 and in Pyodide.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass

from heady_shared.failures import EXPLAIN

PATH = "/"
POLL_MS = 5000  # how often the page polls /api/status while its tab is visible
HERE = os.path.dirname(os.path.abspath(__file__))
_SLOT = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True, slots=True)
class Page:
    status: int
    headers: dict[str, str]
    body: str | None


def read(name: str) -> str:
    """One of the page's files, as bundled beside this module."""
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _fill(template: str, slots: dict[str, str]) -> str:
    """Every `{{name}}` slot of the template filled in one pass (so nothing inserted is read
    as a slot); a slot missing, repeated or unknown is an error at import."""
    found = sorted(_SLOT.findall(template))
    if found != sorted(slots):
        raise ValueError(f"page.html has slots {found}, expected each of {sorted(slots)} once")
    return _SLOT.sub(lambda m: slots[m.group(1)], template)


def _attribute(text: str) -> str:
    """Text safe inside a single-quoted attribute (JSON's own quotes stay as they are)."""
    return text.replace("&", "&amp;").replace("'", "&#39;").replace("<", "&lt;")


def _build() -> tuple[str, dict[str, str]]:
    # Everything is ASCII on purpose (symbols are \u escapes or entities), so the byte count,
    # the hashes and the bytes on the wire cannot disagree about an encoding.
    style, script = "\n" + read("page.css"), "\n" + read("page.js")
    for name, text, end in (("page.css", style, "</style"), ("page.js", script, "</script")):
        if not text.isascii() or end in text.lower():
            raise ValueError(f"{name} must be ASCII and must not contain {end}")
    explain = _attribute(json.dumps(EXPLAIN, sort_keys=True, separators=(",", ":")))
    page = _fill(
        read("page.html"),
        {
            "style": style[1:],  # the template's newline after <style> is part of the hash
            "script": script[1:],
            "poll_ms": str(POLL_MS),
            "poll_s": str(POLL_MS // 1000),
            "explain": explain,
        },
    )
    assert page.isascii()
    csp = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_csp_hash(script)}",
            f"style-src {_csp_hash(style)}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        )
    )
    etag = '"' + hashlib.sha256(page.encode()).hexdigest()[:32] + '"'
    headers = {
        "content-type": "text/html; charset=utf-8",
        # Revalidate on every load: a deploy that changes the page shows at once, and an
        # unchanged page costs a 304 without a body.
        "cache-control": "no-cache",
        "etag": etag,
        "content-security-policy": csp,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "x-frame-options": "DENY",
        "cross-origin-opener-policy": "same-origin",
        "cross-origin-resource-policy": "same-origin",
    }
    return page, headers


HTML, HEADERS = _build()
ETAG = HEADERS["etag"]
_NOT_MODIFIED = {"etag": ETAG, "cache-control": HEADERS["cache-control"]}


def etag_matches(if_none_match: str | None, etag: str = ETAG) -> bool:
    """RFC 9110 13.1.2: If-None-Match uses the weak comparison, so W/"x" matches "x" (a CDN
    that compresses the page may hand the browser a weakened ETag)."""
    if not if_none_match:
        return False
    opaque = etag.removeprefix("W/")
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == opaque:
            return True
    return False


def serve(method: str, path: str, if_none_match: str | None) -> Page | None:
    """The page's answer for this request, or None when the path is not the page's."""
    if path != PATH or method not in ("GET", "HEAD"):
        # Other methods on / answer the shell's JSON 404 (with its request id).
        return None
    if etag_matches(if_none_match):
        return Page(304, dict(_NOT_MODIFIED), None)
    return Page(200, dict(HEADERS), HTML if method == "GET" else None)
