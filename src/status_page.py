"""The operator's status page (issue 11): one self-contained HTML page served by the Worker.

`GET /` answers the page: HTML, CSS and script inline, nothing fetched from elsewhere. The
script asks for a client key once (kept in the browser's localStorage, never in a URL or in
this page) and polls `GET /api/status` with it. The page holds no data and no secret, so it
is the same bytes for everyone: its ETag and the CSP hashes of its inline style and script
are computed once, at import.

Pure Python (hashlib, base64): runs on CPython 3.12/3.13 and in Pyodide.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

from heady_shared.failures import EXPLAIN

PATH = "/"
POLL_MS = 5000  # how often the page polls /api/status while its tab is visible
ALLOW = "GET, HEAD, OPTIONS"


@dataclass(frozen=True, slots=True)
class Page:
    status: int
    headers: dict[str, str]
    body: str | None


# Everything below is ASCII on purpose (symbols are \u escapes or entities), so the byte
# count, the hashes and the bytes on the wire cannot disagree about an encoding.
_STYLE = """
:root{color-scheme:light dark;--bg:#f4f6f8;--fg:#1f2328;--muted:#57606a;--card:#fff;
--line:#d0d7de;--focus:#0969da;--up:#1a7f37;--up-bg:#dafbe1;--down:#c4202b;--down-bg:#ffebe9;
--unknown:#57606a;--unknown-bg:#eaeef2;--invalid:#8a5c00;--invalid-bg:#fff5b1;
--unconfigured:#57606a;--unconfigured-bg:transparent}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#9198a1;
--card:#161b22;--line:#3d444d;--focus:#4493f8;--up:#3fb950;--up-bg:#12301d;--down:#ff7b72;
--down-bg:#3d1619;--unknown:#9198a1;--unknown-bg:#262c36;--invalid:#e3b341;
--invalid-bg:#33270b;--unconfigured:#9198a1}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif}
[hidden]{display:none!important}
:focus-visible{outline:3px solid var(--focus);outline-offset:2px}
.skip{position:absolute;left:-999px;top:0;background:var(--card);padding:.5rem 1rem}
.skip:focus{left:.5rem}
.top{display:flex;flex-wrap:wrap;align-items:center;gap:.4rem 1.25rem;
padding:.9rem clamp(1rem,3vw,2rem);background:var(--card);border-bottom:1px solid var(--line)}
h1{font-size:1.2rem;margin:0;white-space:nowrap}
#summary{margin:0;font-weight:600;flex:1 1 16rem}
#summary[data-ok=false]{color:var(--down)}
.meta{margin:0;color:var(--muted);font-size:.85rem;display:flex;flex-wrap:wrap;gap:.25rem .9rem;
align-items:center;font-variant-numeric:tabular-nums}
button{font:inherit;color:inherit;background:var(--bg);border:1px solid var(--line);
border-radius:.4rem;padding:.3rem .8rem;cursor:pointer}
button.primary{background:var(--focus);border-color:var(--focus);color:#fff;font-weight:600}
main{max-width:84rem;margin:0 auto;padding:1rem clamp(.75rem,3vw,2rem) 2rem}
.banner{border:1px solid var(--c);border-left-width:.4rem;background:var(--t);
border-radius:.5rem;padding:.6rem .9rem;margin:0 0 1rem}
.banner strong{color:var(--c)}
#stale{--c:var(--invalid);--t:var(--invalid-bg)}
#problems{--c:var(--invalid);--t:var(--invalid-bg)}
#problems h2{font-size:1rem;margin:0}
#problems ul{margin:.3rem 0 0;padding-left:1.2rem}
#key-form{max-width:30rem;margin:2rem auto;background:var(--card);border:1px solid var(--line);
border-radius:.6rem;padding:1.25rem}
#key-form h2{margin:0 0 .5rem;font-size:1.1rem}
#key-form label{display:block;font-weight:600;margin:.9rem 0 .3rem}
#key-form input{width:100%;font:inherit;padding:.45rem .6rem;border:1px solid var(--line);
border-radius:.4rem;background:var(--bg);color:var(--fg)}
#key-form .row{display:flex;justify-content:flex-end;margin-top:.9rem}
#key-message[data-kind=error]{--c:var(--down);--t:var(--down-bg)}
#key-message[data-kind=error] strong{color:var(--c)}
body[data-view=key] #status{display:none}
#roles{display:grid;gap:1.25rem;grid-template-columns:repeat(auto-fill,minmax(min(100%,34rem),1fr))}
body[data-stale=true] #roles{opacity:.6}
.role h2{display:flex;flex-wrap:wrap;align-items:baseline;gap:.2rem .7rem;font-size:1.05rem;
margin:0 0 .5rem}
.role h2 .cover{font-size:.85rem;font-weight:500;color:var(--muted)}
.role[data-covered=false] h2 .cover{color:var(--down);font-weight:700}
.tiles{display:grid;gap:.6rem;grid-template-columns:repeat(auto-fill,minmax(min(100%,15.5rem),1fr));
list-style:none;margin:0;padding:0}
.tile{--c:var(--unknown);--t:var(--unknown-bg);background:var(--card);border:1px solid var(--line);
border-left:.45rem solid var(--c);border-radius:.5rem;padding:.6rem .8rem .7rem;min-width:0}
.tile[data-state=up]{--c:var(--up);--t:var(--up-bg)}
.tile[data-state=down]{--c:var(--down);--t:var(--down-bg)}
.tile[data-state=invalid]{--c:var(--invalid);--t:var(--invalid-bg)}
.tile[data-state=unconfigured]{--c:var(--unconfigured);--t:var(--unconfigured-bg);
border-style:dashed;border-left-style:solid}
.tile h3{display:flex;justify-content:space-between;align-items:center;gap:.5rem;margin:0;
font-size:1rem}
.badge{display:inline-flex;align-items:center;gap:.3rem;border-radius:99px;padding:.05rem .6rem;
font-size:.8rem;font-weight:700;letter-spacing:.05em;text-transform:uppercase;color:var(--c);
background:var(--t);border:1px solid var(--c)}
.tile[data-state=down] .badge{background:var(--c);color:var(--card)}
.tile dl{display:grid;grid-template-columns:max-content 1fr;gap:.1rem .7rem;margin:.5rem 0 0;
font-size:.86rem;font-variant-numeric:tabular-nums}
.tile dt{color:var(--muted)}
.tile dd{margin:0;min-width:0;overflow-wrap:anywhere}
.tile dd[data-field=reason]{font-weight:700;color:var(--c)}
.tile dd.why{grid-column:1/-1;color:var(--muted);font-size:.8rem;margin-bottom:.2rem}
.fallback{margin:.5rem 0 0;font-size:.86rem;color:var(--muted)}
.fallback ol{display:inline;margin:0;padding:0;list-style:none}
.fallback li{display:inline}
.fallback li+li:before{content:" \\2192  "}
.fallback .chip{color:var(--fg)}
footer{color:var(--muted);font-size:.8rem;text-align:center;padding:0 1rem 2rem}
@media (max-width:40rem){body{font-size:14px}.top{padding:.7rem .9rem}}
"""

_SCRIPT = r"""
"use strict";
(() => {
const POLL_MS = Number(document.body.dataset.pollMs) || 5000;
const TIMEOUT_MS = 10000;
const STORE = "heady-gateway.client-key";
const $ = (id) => document.getElementById(id);
const form = $("key-form"), input = $("key"), keyMsg = $("key-message");
const summary = $("summary"), version = $("version"), updated = $("updated");
const stale = $("stale"), staleText = $("stale-text"), problems = $("problems");
const roles = $("roles"), change = $("change-key");
const STATES = {
  up: "\u2713", down: "\u2715", unknown: "?", unconfigured: "\u2013", invalid: "!"
};
// What a failure reason usually means on a node: heady_shared.failures.EXPLAIN, the text
// `heady probe` prints too, inserted when the module is imported.
const EXPLAIN = __EXPLAIN__;
let memKey = null, timer = 0, busy = false, lastOk = 0, skew = 0, last = null;

function getKey() {
  try { return localStorage.getItem(STORE) || memKey; } catch (e) { return memKey; }
}
function setKey(k) {
  memKey = k;
  try { localStorage.setItem(STORE, k); } catch (e) { /* private mode: memory only */ }
}
function dropKey() {
  memKey = null;
  try { localStorage.removeItem(STORE); } catch (e) { /* nothing stored */ }
}

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = v; else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of kids) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}

function span(n) {
  const s = Math.round(Math.abs(n) / 1000);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
  return Math.floor(s / 86400) + " d";
}
function clock(ms) {
  const d = new Date(ms), o = {hour: "2-digit", minute: "2-digit", second: "2-digit",
    hour12: false};
  if (Math.abs(Date.now() + skew - ms) > 72e6) { o.month = "short"; o.day = "numeric"; }
  return d.toLocaleString([], o);
}
function when(iso) {
  const t = Date.parse(iso);
  if (isNaN(t)) return null;
  const d = t - (Date.now() + skew);
  if (Math.abs(d) < 1500) return clock(t) + " (now)";
  return clock(t) + (d > 0 ? " (in " + span(d) + ")" : " (" + span(d) + " ago)");
}
function shown(n) {
  return n.config === "configured" ? String(n.state) : String(n.config);
}
function available(n) {
  return !!n && n.config === "configured" && n.state !== "down";
}

function tile(n) {
  const st = shown(n), rows = [];
  const add = (label, value, field) => {
    if (value === null || value === undefined || value === "") return;
    rows.push(el("dt", {text: label}), el("dd", {"data-field": field, text: value}));
  };
  if (n.config !== "configured") {
    add("config", n.config_reason || n.config, "config");
  } else {
    if (n.reason && st !== "up") {
      add(st === "down" ? "reason" : "last failure", String(n.reason), "reason");
      if (Object.hasOwn(EXPLAIN, n.reason)) {
        rows.push(el("dd", {class: "why", "data-field": "why", text: EXPLAIN[n.reason]}));
      }
    }
    if (st === "unknown" && !n.since && !n.checked_at) add("state", "not observed yet", "note");
    add("since", n.since && when(n.since), "since");
    add("cooldown until", n.until && when(n.until), "until");
    add(st === "up" ? "latency" : "last latency", n.latency_ms === null ||
      n.latency_ms === undefined ? null : Math.round(n.latency_ms) + " ms", "latency");
    add("queue", n.load === null || n.load === undefined ? null : n.load + " waiting", "load");
    if (n.failures) add("failures", String(n.failures), "failures");
    add("probed", n.checked_at && when(n.checked_at), "checked");
  }
  const label = "Node " + n.node + ": " + st +
    (n.reason && st === "down" ? ", " + n.reason : "");
  return el("li", {class: "tile", "data-node": n.node, "data-state": st, tabindex: 0,
    "aria-label": label},
    el("h3", {}, "Node " + n.node,
      el("span", {class: "badge"}, el("span", {"aria-hidden": "true", text: STATES[st] || "?"}),
        st)),
    el("dl", {}, ...rows));
}

function roleSection(name, route, byNum) {
  const pair = (route.pair || []).map((k) => byNum.get(k)).filter(Boolean);
  const fb = (route.fallback || []).filter((k) => !(route.pair || []).includes(k));
  const up = pair.filter(available).length;
  const covered = up > 0 || fb.some((k) => available(byNum.get(k)));
  const cover = up > 0 ? up + " of " + pair.length + " available"
    : covered ? "pair unavailable: falling back" : "no node can serve this role";
  const chain = fb.map((k) => {
    const n = byNum.get(k), st = n ? shown(n) : "unknown";
    return el("li", {}, el("span", {class: "chip"}, "node " + k), " (" + st + ")");
  });
  return el("section", {class: "role", "data-role": name, "data-covered": String(covered),
    "aria-label": "role " + name},
    el("h2", {}, name, el("span", {class: "cover", text: cover})),
    el("ul", {class: "tiles"}, ...pair.map(tile)),
    chain.length ? el("p", {class: "fallback"}, "Fallback: ", el("ol", {}, ...chain)) : null);
}

function render(data) {
  const nodes = data.nodes, byNum = new Map(nodes.map((n) => [n.node, n]));
  const routes = data.routes || {}, inPair = new Set();
  const focused = document.activeElement && document.activeElement.closest &&
    document.activeElement.closest(".tile");
  const keep = focused ? [focused.closest(".role").dataset.role, focused.dataset.node] : null;
  const sections = Object.entries(routes).map(([name, r]) => {
    (r.pair || []).forEach((k) => inPair.add(k));
    return roleSection(name, r, byNum);
  });
  const rest = nodes.filter((n) => !inPair.has(n.node));
  if (rest.length) {
    sections.push(el("section", {class: "role", "data-role": "", "aria-label": "no role"},
      el("h2", {}, "in no role's pair"), el("ul", {class: "tiles"}, ...rest.map(tile))));
  }
  roles.replaceChildren(...sections);
  if (keep) {
    const again = roles.querySelector(
      '.role[data-role="' + CSS.escape(keep[0]) + '"] .tile[data-node="' + keep[1] + '"]');
    if (again) again.focus();
  }

  const counts = {};
  for (const n of nodes) counts[shown(n)] = (counts[shown(n)] || 0) + 1;
  const order = ["up", "down", "unknown", "invalid", "unconfigured"];
  const parts = order.filter((s) => counts[s]).map((s) => counts[s] + " " + s);
  Object.keys(counts).filter((s) => !order.includes(s)).forEach((s) =>
    parts.push(counts[s] + " " + s));
  const uncovered = sections.filter((s) => s.dataset.covered === "false")
    .map((s) => s.dataset.role);
  summary.textContent = nodes.length + " nodes: " + parts.join(", ") +
    (uncovered.length ? ". No node can serve: " + uncovered.join(", ") : "");
  summary.dataset.ok = uncovered.length ? "false" : "true";

  const probs = Array.isArray(data.problems) ? data.problems : [];
  problems.hidden = probs.length === 0;
  problems.querySelector("ul").replaceChildren(...probs.map((p) => el("li", {text: p})));
  const g = data.gateway || {};
  version.textContent = "gateway " + (g.version || "?") +
    (g.auth === "disabled" ? " (auth disabled)" : "");
}

function markStale(why) {
  if (last) render(last);  // the last known state, its "ago" times brought up to date
  document.body.dataset.stale = "true";
  stale.hidden = false;
  staleText.textContent = why + ". Showing " +
    (lastOk ? "the update of " + clock(lastOk + skew) : "nothing yet") +
    "; retrying every " + POLL_MS / 1000 + " s.";
}

function askKey(message) {
  clearTimeout(timer);
  timer = 0;
  // No key, no data: what an earlier key showed is not left on screen.
  last = null;
  lastOk = 0;
  roles.replaceChildren();
  problems.hidden = stale.hidden = true;
  document.body.dataset.stale = "false";
  updated.textContent = "not updated yet";
  document.body.dataset.view = "key";
  form.hidden = false;
  change.hidden = true;
  keyMsg.dataset.kind = message ? "error" : "info";
  keyMsg.replaceChildren(message ? el("strong", {text: message + " "}) : "",
    "Enter one of the gateway's client keys (GATEWAY_API_KEYS). It is kept in this " +
    "browser's storage and sent only to this gateway, in a header.");
  summary.textContent = message ? "Key rejected" : "Waiting for a client key";
  input.value = "";
  input.focus();
}

function schedule() {
  clearTimeout(timer);
  timer = document.hidden ? 0 : setTimeout(poll, POLL_MS);
}

async function poll() {
  clearTimeout(timer);
  timer = 0;
  const key = getKey();
  if (!key) { askKey(); return; }
  if (busy) return;
  busy = true;
  const ctl = new AbortController(), cut = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  try {
    const r = await fetch("/api/status", {
      headers: {authorization: "Bearer " + key, accept: "application/json"},
      cache: "no-store", credentials: "omit", redirect: "error", signal: ctl.signal});
    if (r.status === 401) {
      dropKey();
      askKey("The gateway rejected this key (HTTP 401).");
      return;
    }
    const body = await r.json().catch(() => null);
    if (r.ok && body && Array.isArray(body.nodes)) {
      // The gateway's clock (gateway.time, else the Date header), for "ago" and "in".
      const served = Date.parse((body.gateway && body.gateway.time) || r.headers.get("date") || "");
      const diff = isNaN(served) ? 0 : served - Date.now();
      skew = Math.abs(diff) > 2500 ? diff : 0;
      lastOk = Date.now();
      last = body;
      render(body);
      document.body.dataset.stale = "false";
      stale.hidden = true;
      updated.textContent = "updated " + clock(lastOk + skew);
      updated.dataset.at = String(lastOk);
    } else {
      const err = body && body.error ? body.error : {};
      markStale("The gateway answered HTTP " + r.status +
        (err.type ? " " + err.type : "") + (err.message ? ": " + err.message : ""));
    }
  } catch (e) {
    markStale(ctl.signal.aborted ? "No answer from the gateway within " +
      TIMEOUT_MS / 1000 + " s" : "The gateway cannot be reached");
  } finally {
    clearTimeout(cut);
    busy = false;
  }
  if (document.body.dataset.view === "status") schedule();
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const k = input.value.trim();
  input.value = "";
  if (!k) { input.focus(); return; }
  setKey(k);
  form.hidden = true;
  change.hidden = false;
  document.body.dataset.view = "status";
  summary.textContent = "Loading\u2026";
  poll();
});
change.addEventListener("click", () => { dropKey(); askKey(); });
document.addEventListener("visibilitychange", () => {
  if (document.hidden) { clearTimeout(timer); timer = 0; }
  else if (document.body.dataset.view === "status") poll();
});
if (getKey()) {
  document.body.dataset.view = "status";
  change.hidden = false;
  poll();
} else {
  askKey();
}
})();
"""

_BODY = """
<a class="skip" href="#roles">Skip to the nodes</a>
<header class="top">
<h1>Heady gateway</h1>
<p id="summary" role="status" aria-live="polite">Loading&hellip;</p>
<p class="meta"><span id="version"></span><span id="updated">not updated yet</span>
<button id="change-key" type="button" hidden>Change key</button></p>
</header>
<main>
<noscript><p class="banner">This page needs JavaScript. Without it, use
<code>GET /api/status</code> or <code>heady status</code>.</p></noscript>
<form id="key-form" hidden>
<h2>Client key</h2>
<p id="key-message" class="banner"></p>
<label for="key">Client key</label>
<input id="key" type="password" autocomplete="off" autocapitalize="off" spellcheck="false">
<div class="row"><button class="primary" type="submit">Show cluster status</button></div>
</form>
<div id="status">
<p id="stale" class="banner" role="alert" hidden><strong>Stale.</strong>
<span id="stale-text"></span></p>
<section id="problems" class="banner" hidden aria-labelledby="problems-title">
<h2 id="problems-title">Configuration problems</h2><ul></ul></section>
<div id="roles"></div>
</div>
</main>
<footer>Polls <code>/api/status</code> every {poll_s} s while this tab is visible.
State by word and symbol: &#x2713; up &middot; &#x2715; down &middot; ? unknown &middot;
! invalid &middot; &ndash; unconfigured.</footer>
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _script_json(value: object) -> str:
    """A JSON literal safe inside an inline <script>: ASCII, and no '<' to end the element."""
    return json.dumps(value, sort_keys=True).replace("<", "\\u003c")


def _build() -> tuple[str, dict[str, str]]:
    body = _BODY.replace("{poll_s}", str(POLL_MS // 1000))
    script = _SCRIPT.replace("__EXPLAIN__", _script_json(EXPLAIN))
    html = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light dark">\n'
        "<title>Heady gateway \u00b7 cluster status</title>\n"
        '<link rel="icon" href="data:,">\n'
        f"<style>{_STYLE}</style>\n</head>\n"
        f'<body data-poll-ms="{POLL_MS}" data-view="key">{body}'
        f"<script>{script}</script>\n</body>\n</html>\n"
    ).replace("\u00b7", "&middot;")
    assert html.isascii()
    csp = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_csp_hash(script)}",
            f"style-src {_csp_hash(_STYLE)}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        )
    )
    etag = '"' + hashlib.sha256(html.encode()).hexdigest()[:32] + '"'
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
    return html, headers


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
