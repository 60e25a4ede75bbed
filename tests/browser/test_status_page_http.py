"""The status page as the real offline Workers runtime serves it (workerd + Pyodide): bytes,
headers, conditional requests, methods, and that the JSON API around it is unchanged."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from page_stack import API_KEY, secrets_of, start_gateway

import status_page as sp
from harness.gateway import Gateway
from sim.fleet import FleetProcess

SECURITY_HEADERS = (
    "content-security-policy",
    "x-content-type-options",
    "referrer-policy",
    "x-frame-options",
    "cross-origin-opener-policy",
)


@pytest.fixture(scope="module")
def gateway(page_fleet: FleetProcess) -> Iterator[Gateway]:
    gw = start_gateway(page_fleet)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    # identity: the bytes as the Worker wrote them (workerd compresses when asked).
    with httpx.Client(
        base_url=gateway.url, timeout=30, headers={"accept-encoding": "identity"}
    ) as c:
        yield c


def test_get_serves_the_module_page_byte_for_byte(http: httpx.Client) -> None:
    r = http.get("/")
    assert r.status_code == 200
    assert r.content == sp.HTML.encode()
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["etag"] == sp.ETAG
    assert r.headers["cache-control"] == "no-cache"
    for name in SECURITY_HEADERS:
        assert r.headers[name] == sp.HEADERS[name]
    assert "access-control-allow-origin" not in r.headers


def test_compressed_when_asked_with_the_same_validator(gateway: Gateway) -> None:
    r = httpx.get(gateway.url + "/", headers={"accept-encoding": "gzip"}, timeout=30)
    assert r.status_code == 200
    assert r.headers.get("content-encoding") == "gzip"
    assert r.text == sp.HTML  # httpx decoded it
    assert r.headers["etag"] == sp.ETAG


@pytest.mark.parametrize("inm", [sp.ETAG, "W/" + sp.ETAG])
def test_revalidation_answers_304_without_body(http: httpx.Client, inm: str) -> None:
    r = http.get("/", headers={"if-none-match": inm})
    assert r.status_code == 304
    assert r.content == b""
    assert r.headers["etag"] == sp.ETAG


def test_stale_validator_gets_the_page(http: httpx.Client) -> None:
    r = http.get("/", headers={"if-none-match": '"0123456789abcdef0123456789abcdef"'})
    assert r.status_code == 200 and r.content == sp.HTML.encode()


def test_head_answers_the_headers_only(http: httpx.Client) -> None:
    r = http.head("/")
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["etag"] == sp.ETAG
    assert r.headers["content-security-policy"] == sp.HEADERS["content-security-policy"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_get_the_gateways_json_404(http: httpx.Client, method: str) -> None:
    r = http.request(method, "/", content=b"{}")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "not_found"
    assert err["request_id"] == r.headers["x-request-id"]


def test_page_source_holds_no_secret(http: httpx.Client, page_fleet: FleetProcess) -> None:
    text = (
        http.get("/").text
        + "\n"
        + "\n".join(f"{k}: {v}" for k, v in http.head("/").headers.items())
    )
    for secret in secrets_of(page_fleet):
        assert secret not in text
    assert not re.search(r"127\.0\.0\.1:\d+", text)


def test_the_json_apis_cors_is_unchanged(http: httpx.Client) -> None:
    # wrangler.toml's CORS_ORIGINS="*": the API stays readable cross-origin, the page not.
    origin = {"origin": "https://ops.example"}
    status = http.get("/api/status", headers={"authorization": f"Bearer {API_KEY}", **origin})
    assert status.status_code == 200
    assert status.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-origin" not in http.get("/", headers=origin).headers
    pre = http.options(
        "/api/status",
        headers={
            **origin,
            "access-control-request-method": "GET",
            "access-control-request-headers": "authorization",
        },
    )
    assert pre.status_code == 204
    assert "authorization" in pre.headers["access-control-allow-headers"]
