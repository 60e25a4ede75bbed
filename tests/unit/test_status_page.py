"""The status page module on CPython: what serve() answers, that the page's CSP hashes, ETag
and markup agree with the bytes it serves (recomputed here from the HTML itself), and that
those bytes are the files in src/status_page/ (the script is checked as the file it is)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

import pytest

import status_page as sp
from heady_shared.failures import EXPLAIN

PAGE_DIR = Path(sp.__file__).parent
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (PAGE_DIR / "page.js").read_text()
STYLE = (PAGE_DIR / "page.css").read_text()


class _Scan(HTMLParser):
    """Inline script/style texts and every tag's attributes, as a browser tokenises them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._in = tag
            (self.scripts if tag == "script" else self.styles).append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "script":
            self.scripts[-1] += data
        elif self._in == "style":
            self.styles[-1] += data


def _scan() -> _Scan:
    s = _Scan()
    s.feed(sp.HTML)
    s.close()
    return s


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _csp() -> dict[str, str]:
    out = {}
    for part in sp.HEADERS["content-security-policy"].split(";"):
        name, _, value = part.strip().partition(" ")
        out[name] = value
    return out


def test_get_serves_the_page_with_its_headers() -> None:
    page = sp.serve("GET", "/", None)
    assert page is not None
    assert page.status == 200
    assert page.body == sp.HTML
    h = page.headers
    assert h["content-type"] == "text/html; charset=utf-8"
    assert h["etag"] == sp.ETAG
    assert h["cache-control"] == "no-cache"
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"
    assert h["x-frame-options"] == "DENY"
    assert "access-control-allow-origin" not in h  # the page is not readable cross-origin


def test_head_has_the_get_headers_and_no_body() -> None:
    get, head = sp.serve("GET", "/", None), sp.serve("HEAD", "/", None)
    assert head is not None and get is not None
    assert (head.status, head.body) == (200, None)
    assert head.headers == get.headers


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    "inm",
    [sp.ETAG, "W/" + sp.ETAG, f'"other", {sp.ETAG}', f'W/"x",W/{sp.ETAG}', "*"],
)
def test_a_matching_if_none_match_answers_304_without_body(method: str, inm: str) -> None:
    page = sp.serve(method, "/", inm)
    assert page is not None
    assert (page.status, page.body) == (304, None)
    assert page.headers == {"etag": sp.ETAG, "cache-control": "no-cache"}


@pytest.mark.parametrize("inm", ['"other"', "", sp.ETAG.strip('"'), 'W/"nope"', sp.ETAG + "x"])
def test_a_different_if_none_match_gets_the_full_page(inm: str) -> None:
    page = sp.serve("GET", "/", inm)
    assert page is not None
    assert (page.status, page.body) == (200, sp.HTML)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get"])
def test_other_methods_are_left_to_the_shell(method: str) -> None:
    # The shell answers them with its JSON 404 and request id.
    assert sp.serve(method, "/", None) is None


@pytest.mark.parametrize(
    "path", ["/status", "/index.html", "//", "/api", "/api/status", "/healthz", "", "/?"]
)
def test_other_paths_are_not_the_page(path: str) -> None:
    assert sp.serve("GET", path, None) is None


def test_served_headers_are_a_copy() -> None:
    page = sp.serve("GET", "/", None)
    assert page is not None
    page.headers["etag"] = "tampered"
    again = sp.serve("GET", "/", None)
    assert again is not None and again.headers["etag"] == sp.ETAG


def test_etag_is_the_content_hash_of_the_served_bytes() -> None:
    assert '"' + hashlib.sha256(sp.HTML.encode()).hexdigest()[:32] + '"' == sp.ETAG


def test_csp_allows_exactly_the_inline_script_and_style_it_serves() -> None:
    scan, csp = _scan(), _csp()
    assert len(scan.scripts) == 1 and len(scan.styles) == 1
    assert csp["script-src"] == _sha256(scan.scripts[0])
    assert csp["style-src"] == _sha256(scan.styles[0])
    assert csp["default-src"] == "'none'"
    assert csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"
    assert csp["base-uri"] == "'none'" and csp["form-action"] == "'none'"
    assert "unsafe" not in sp.HEADERS["content-security-policy"]


def test_markup_has_no_inline_handlers_style_attributes_or_external_resources() -> None:
    for tag, attrs in _scan().tags:
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)
        assert "style" not in attrs, (tag, attrs)
        assert "src" not in attrs, (tag, attrs)  # the script is inline and hashed
        href = attrs.get("href")
        assert href is None or href.startswith(("#", "data:")), (tag, attrs)
        if tag == "form":
            assert "action" not in attrs
        if tag == "input":
            # No name: even a form submitted without the script carries no key.
            assert "name" not in attrs and attrs.get("autocomplete") == "off"


def _body_attrs() -> dict[str, str | None]:
    return next(attrs for tag, attrs in _scan().tags if tag == "body")


def test_the_page_inlines_its_script_and_style_files_verbatim() -> None:
    scan = _scan()
    # The template's newline after <script>/<style> belongs to the hashed text.
    assert scan.scripts == ["\n" + SCRIPT]
    assert scan.styles == ["\n" + STYLE]
    assert "{{" not in sp.HTML.replace(SCRIPT, "").replace(STYLE, "")  # every slot filled


def test_the_page_files_are_what_wrangler_and_the_harness_bundle_as_text() -> None:
    rules = tomllib.loads((ROOT / "wrangler.toml").read_text())["rules"]
    text_globs = [g for r in rules if r["type"] == "Text" for g in r["globs"]]
    for name in ("page.html", "page.css", "page.js"):
        assert any(fnmatch(f"status_page/{name}", g) for g in text_globs), name
    assert not any(fnmatch("status_page/__init__.py", g) for g in text_globs)


@pytest.mark.parametrize(
    "template",
    [
        "<p>{{style}}{{script}}{{poll_ms}}{{poll_s}}</p>",  # one missing
        "{{style}}{{script}}{{poll_ms}}{{poll_s}}{{explain}}{{style}}",  # one twice
        "{{style}}{{script}}{{poll_ms}}{{poll_s}}{{explain}}{{nope}}",  # one unknown
    ],
)
def test_a_template_slot_missing_repeated_or_unknown_fails_the_build(template: str) -> None:
    slots = dict.fromkeys(("style", "script", "poll_ms", "poll_s", "explain"), "")
    with pytest.raises(ValueError, match="slots"):
        sp._fill(template, slots)


def test_inserted_text_is_not_read_as_a_slot() -> None:
    assert sp._fill("<{{a}}|{{b}}>", {"a": "{{b}}", "b": "x"}) == "<{{b}}|x>"


def test_the_script_takes_shared_values_from_the_page_and_copies_none() -> None:
    assert "Number(document.body.dataset.pollMs)" in SCRIPT
    assert "JSON.parse(document.body.dataset.explain)" in SCRIPT
    assert str(sp.POLL_MS) not in SCRIPT  # no fallback copy of the period
    assert not any(text in SCRIPT for text in EXPLAIN.values())  # no copy of the explanations


def test_page_basics_title_language_viewport_colour_scheme_and_poll_period() -> None:
    html = sp.HTML
    assert re.search(r"<title>Heady gateway &middot; cluster status</title>", html)
    assert '<html lang="en">' in html
    assert 'name="viewport" content="width=device-width, initial-scale=1"' in html
    assert 'name="color-scheme" content="light dark"' in html
    assert "prefers-color-scheme:dark" in html
    assert _body_attrs()["data-poll-ms"] == str(sp.POLL_MS)
    assert f"every {sp.POLL_MS // 1000} s" in html


def test_page_is_ascii_and_small() -> None:
    raw = sp.HTML.encode("ascii")
    # Budget: one small response from the Worker, well under a typical 14 KiB first flight
    # once compressed (9 KiB since the Batches section: 8.0 KiB with it; 26 KiB raw since the
    # Fine-tuning section: 24.9 KiB raw and 8.8 KiB gzip with it, ~200 bytes under the gzip budget).
    assert len(raw) < 26 * 1024
    assert len(gzip.compress(raw, 9)) < 9 * 1024


def test_the_page_names_no_key_and_puts_nothing_in_a_url() -> None:
    script = SCRIPT
    # The only request is a header-authenticated fetch of /api/status.
    assert re.findall(r"fetch\(\"([^\"]*)\"", script) == ["/api/status"]
    assert "location" not in script and "history" not in script
    assert "innerHTML" not in script and "outerHTML" not in script
    assert "localStorage.setItem" in script


def test_reason_explanations_are_the_ones_heady_probe_prints() -> None:
    # The parser unescapes the attribute as a browser does; the script JSON.parses it.
    attr = _body_attrs()["data-explain"]
    assert attr is not None and json.loads(attr) == EXPLAIN


def test_explanations_cannot_break_out_of_their_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = {"x": "it's <b>&amp;</b> \"quoted\"'>"}
    monkeypatch.setattr(sp, "EXPLAIN", hostile)
    page, _ = sp._build()
    s = _Scan()
    s.feed(page)
    s.close()
    body = next(attrs for tag, attrs in s.tags if tag == "body")
    assert json.loads(body["data-explain"] or "") == hostile
    assert [t for t, _ in s.tags].count("b") == 0  # no markup escaped into the page
