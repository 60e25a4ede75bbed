"use strict";
(() => {
// Shared values come from the page (status_page/__init__.py sets them): one source each.
const POLL_MS = Number(document.body.dataset.pollMs);
const TIMEOUT_MS = 10000;
const STORE = "heady-gateway.client-key";
const $ = (id) => document.getElementById(id);
const form = $("key-form"), input = $("key"), keyMsg = $("key-message");
const summary = $("summary"), version = $("version"), updated = $("updated");
const stale = $("stale"), staleText = $("stale-text"), problems = $("problems");
const roles = $("roles"), change = $("change-key"), batches = $("batches"), ft = $("ft");
const STATES = {
  up: "\u2713", down: "\u2715", unknown: "?", unconfigured: "\u2013", invalid: "!"
};
// What a failure reason usually means on a node: heady_shared.failures.EXPLAIN, the text
// `heady probe` prints too.
const EXPLAIN = JSON.parse(document.body.dataset.explain);
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
  return at(Date.parse(iso));
}
function at(t) {
  if (typeof t !== "number" || isNaN(t)) return null;
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
    // What the node reports it serves (its capability gauges); absent until the cron reads it.
    add("serves", Array.isArray(n.capabilities) ? (n.capabilities.map((c) =>
      c.replace("_", " ")).join(", ") || "nothing reported") : null, "capabilities");
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

// Batches: /api/status's `batches` (the caller's open ones; `running` counts every key's).
const num = (v) => (typeof v === "number" && isFinite(v) && v > 0 ? v : 0);
const fmt = (v) => num(v).toLocaleString("en-US");
function bar(kind, part, total) {
  const e = el("span", {class: kind});
  e.style.width = (total ? Math.min(100, 100 * part / total) : 0) + "%";  // CSSOM: CSP-safe
  return e;
}
// A job's card (batches and fine-tuning jobs alike): id and status, a progress bar of `bars`
// (done of max), the progress in words, then `rest`.
function card(kind, id, status, done, max, bars, progress, ...rest) {
  return el("li", {class: "batch", ["data-" + kind]: id, "data-status": status},
    el("h3", {}, el("code", {text: String(id)}), el("span", {class: "status", text: status})),
    el("div", {class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": max,
      "aria-valuenow": done, "aria-label": kind + " " + id + ": " + progress}, ...bars),
    el("p", {class: "progress", "data-field": "progress", text: progress}), ...rest);
}
function holder(h, what) {
  return el("li", {"data-node": h.node, "data-seq": h.seq},
    el("span", {class: "chip"}, "node " + (h.node === null ? "?" : h.node)), " " + what +
    (num(h.expires_at) ? ", lease until " + at(h.expires_at * 1000) : ""));
}
function batchCard(b) {
  const rc = b.request_counts || {}, total = num(rc.total);
  const ok = num(rc.completed), bad = num(rc.failed), done = ok + bad;
  const pct = total ? Math.floor(100 * done / total) : 0;
  const status = String(b.status || "?"), sh = b.shards || {};
  const progress = status === "validating" && !total ? "validating the input file"
    : fmt(done) + " of " + fmt(total) + " lines (" + pct + "%)" +
      (bad ? ", " + fmt(bad) + " failed" : "");
  const holders = (Array.isArray(b.holders) ? b.holders : []).map((h) => holder(h,
    h.kind === "validate" ? "validating" : "shard " + h.seq + " (" + fmt(h.lines) + " lines)"));
  const shards = num(sh.total) ? "shards: " + fmt(sh.done) + " done, " + fmt(sh.leased) +
    " running, " + fmt(sh.pending) + " waiting, of " + fmt(sh.total) : null;
  const meta = [b.model ? "model " + b.model : null, b.role ? "role " + b.role : null,
    b.created_at ? "created " + at(b.created_at * 1000) : null].filter(Boolean).join(" \u00b7 ");
  return card("batch", b.id, status, done, total, [bar("ok", ok, total), bar("fail", bad, total)],
    progress, meta ? el("p", {class: "bmeta", text: meta}) : null,
    shards ? el("p", {class: "shards", "data-field": "shards", text: shards}) : null,
    holders.length ? el("ul", {class: "holders", "aria-label": "who holds which shard"},
      ...holders) : null);
}
function renderBatches(info) {
  const mine = info && Array.isArray(info.mine) ? info.mine : [];
  const running = info ? num(info.running) : 0;
  batches.hidden = !mine.length && !running;
  // `mine` is at most 20 (newest first); `running` counts every key's batches at work.
  $("batches-count").textContent = (mine.length ? mine.length + " open for this key, " : "") +
    running + " at work in all";
  $("batch-list").replaceChildren(...mine.map(batchCard));
}

// Fine-tuning: /api/status's `fine_tuning` (the caller's active and newest finished jobs;
// `active` counts every key's, `nodes` are the nodes training now). Drawn as batch cards.
const ACTIVE = ["validating_files", "queued", "running"];
function ftCard(j) {
  const p = j.progress || {}, total = num(p.total_steps), step = num(p.step);
  const status = String(j.status || "?"), e = j.error, h = j.holder;
  const loss = typeof p.train_loss === "number" ? ", loss " + p.train_loss.toFixed(4) : "";
  const progress = step ? "step " + fmt(step) + (total ? " of " + fmt(total) + " (" +
      Math.floor(100 * Math.min(step, total) / total) + "%)" : "") +
      (p.epoch ? ", epoch " + p.epoch + (p.n_epochs ? " of " + p.n_epochs : "") : "") + loss
    : status === "validating_files" ? "validating the training file"
    : status === "queued" ? "waiting for a training node" : "no step reported";
  const meta = ["base model " + j.model, j.suffix ? "suffix " + j.suffix : null,
    num(j.checkpoints) ? j.checkpoints + " checkpoint" + (j.checkpoints > 1 ? "s" : "") : null,
    j.created_at ? "created " + at(j.created_at * 1000) : null,
    j.finished_at ? "finished " + at(j.finished_at * 1000) : null].filter(Boolean)
    .join(" \u00b7 ");
  const out = j.fine_tuned_model;
  return card("job", j.id, status, step, total, [bar(status === "failed" ? "fail" : "ok", step,
    total)], progress, out ? el("p", {"data-field": "model"}, "fine-tuned model ",
    el("code", {text: out}))
    : null, el("p", {class: "bmeta", text: meta}),
    e ? el("p", {class: "err", "data-field": "error", text: e.code + ": " + e.message}) : null,
    h ? el("ul", {class: "holders", "aria-label": "who trains it"},
      holder(h, "training" + (h.attempt > 1 ? " (attempt " + h.attempt + ")" : ""))) : null);
}
function renderFt(info) {
  const mine = info && Array.isArray(info.mine) ? info.mine : [];
  const active = info ? num(info.active) : 0, nodes = info && info.nodes || [];
  ft.hidden = !mine.length && !active;
  $("ft-count").textContent = mine.filter((j) => ACTIVE.includes(j.status)).length +
    " active for this key, " + active + " in all" +
    (nodes.length ? "; training on node " + nodes.join(", ") : "");
  $("ft-list").replaceChildren(...mine.map(ftCard));
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
  renderBatches(data.batches);
  renderFt(data.fine_tuning);
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
  $("batch-list").replaceChildren();
  $("ft-list").replaceChildren();
  problems.hidden = stale.hidden = batches.hidden = ft.hidden = true;
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
