// meterline console: a small static app over the meterline HTTP API (no framework, no CDN).
// The API key lives in this tab's sessionStorage and goes out as `Authorization: Bearer`.
// Money arrives as exact decimal strings; it is rounded for display with BigInt arithmetic
// (half-up to the cent, like the statements), never through floats. Floats only size the bars.
"use strict";

const KEY = "meterline.key";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// "12.345" -> "12.35" (half-up, away from zero on ties, like Python's ROUND_HALF_UP); thousands commas.
function cents(text) {
  let s = String(text).trim();
  const neg = s.startsWith("-");
  if (neg || s.startsWith("+")) s = s.slice(1);
  let [int, frac = ""] = s.split(".");
  frac = (frac + "000").slice(0, Math.max(3, frac.length));
  let n = BigInt((int || "0") + frac.slice(0, 2));
  if (Number(frac[2]) >= 5) n += 1n;
  const digits = n.toString().padStart(3, "0");
  const whole = digits.slice(0, -2).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  const out = `${whole}.${digits.slice(-2)}`;
  return neg && n !== 0n ? `-${out}` : out;
}

async function api(path, opts = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = Object.assign({ Authorization: `Bearer ${key}` }, opts.headers || {});
  const res = await fetch(path, Object.assign({}, opts, { headers }));
  if (!res.ok) {
    let msg = `${res.status}`;
    try { const body = await res.json(); msg = `${res.status} ${body.error.code}: ${body.error.message}`; } catch (e) { /* not JSON */ }
    const err = new Error(msg);
    err.status = res.status;
    throw err;
  }
  return (res.headers.get("content-type") || "").includes("json") ? res.json() : res.text();
}

// ---------------------------------------------------------------------------- charts

function hbars(target, entries, currency) {
  target.replaceChildren();
  if (!entries.length) { target.append(el("p", { class: "muted" }, "No usage in this period.")); return; }
  entries.sort((a, b) => Number(b[1]) - Number(a[1]) || (a[0] < b[0] ? -1 : 1));
  const total = entries.reduce((t, [, v]) => t + Number(v), 0);
  const peak = Math.max(...entries.map(([, v]) => Number(v)));
  const width = 760, nameW = 180, valueW = 220, rowH = 24, barMax = width - nameW - valueW;
  const svg = el("svg:svg", { width, height: rowH * entries.length + 8, role: "img", class: "hbars" });
  entries.forEach(([name, value], i) => {
    const y = 4 + i * rowH;
    const w = Math.max(1, peak > 0 ? (Number(value) / peak) * barMax : 0);
    const share = total > 0 ? ` (${((Number(value) / total) * 100).toFixed(1)} %)` : "";
    svg.append(el("svg:text", { x: nameW - 8, y: y + 16, "font-size": 12, "text-anchor": "end" }, name));
    svg.append(el("svg:rect", { class: "bar", x: nameW, y: y + 3, width: w.toFixed(1), height: rowH - 6,
                                "data-label": name, "data-value": value }, el("svg:title", {}, `${name}: ${value}`)));
    svg.append(el("svg:text", { x: (nameW + w + 6).toFixed(1), y: y + 16, "font-size": 12, class: "value",
                                "data-label": name }, `${cents(value)} ${currency.toUpperCase()}${share}`));
  });
  target.append(svg);
}

function dayColumns(target, byDay, start, end, currency) {
  target.replaceChildren();
  const used = Object.keys(byDay);
  if (!used.length) { target.append(el("p", { class: "muted" }, "No usage in this period.")); return; }
  const days = [];
  for (let d = new Date(`${start}T00:00:00Z`); d < new Date(`${end}T00:00:00Z`) && days.length <= 62; d.setUTCDate(d.getUTCDate() + 1)) {
    days.push(d.toISOString().slice(0, 10));
  }
  const list = days.length && days.length <= 62 ? days : used.sort();
  const width = 760, height = 220, padT = 24, padB = 40, pad = 10;
  const slot = (width - 2 * pad) / list.length, barW = Math.min(48, Math.max(2, slot - 4));
  const peak = Math.max(...used.map((d) => Number(byDay[d])));
  const base = height - padB, plot = height - padT - padB;
  const svg = el("svg:svg", { width, height, role: "img", class: "days" });
  svg.append(el("svg:line", { x1: pad, y1: base, x2: width - pad, y2: base, stroke: "#888" }));
  const every = Math.max(1, Math.round(list.length / 12));
  list.forEach((day, i) => {
    const value = byDay[day];
    const cx = pad + (i + 0.5) * slot;
    if (value !== undefined) {
      const h = peak > 0 ? (Number(value) / peak) * plot : 0;
      svg.append(el("svg:rect", { class: "bar", x: (cx - barW / 2).toFixed(1), y: (base - h).toFixed(1), width: barW.toFixed(1),
                                  height: h.toFixed(1), "data-label": day, "data-value": value },
                    el("svg:title", {}, `${day}: ${cents(value)} ${currency.toUpperCase()}`)));
      if (slot >= 44 || used.length === 1) {
        svg.append(el("svg:text", { x: cx.toFixed(1), y: (base - h - 5).toFixed(1), "font-size": 11, "text-anchor": "middle",
                                    class: "value", "data-label": day }, cents(value)));
      }
    }
    if (i % every === 0 || (value !== undefined && used.length === 1)) {
      svg.append(el("svg:text", { x: cx.toFixed(1), y: base + 14, "font-size": 10, "text-anchor": "middle" }, day.slice(5)));
    }
  });
  svg.append(el("svg:text", { x: pad, y: height - 6, "font-size": 11 }, `${start} – ${list[list.length - 1]} (UTC)`));
  target.append(svg);
}

// ---------------------------------------------------------------------------- views

let me = null;
let current = null; // the customer being shown

function table(columns, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", {}, c)))),
            el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c))))));
}

async function showCustomer(customer) {
  current = customer;
  $("customer").hidden = false;
  $("customer-id").textContent = customer;
  $("statement").hidden = true;
  const period = $("period").value.trim();
  const q = `customer_id=${encodeURIComponent(customer)}${period ? `&period=${encodeURIComponent(period)}` : ""}`;
  await Promise.all([loadBalance(customer), loadSpend(q), loadAlerts(customer), loadPlans(customer, period)]);
}

async function loadBalance(customer) {
  const id = encodeURIComponent(customer);
  $("allowances").replaceChildren();
  try {
    const [bal, st] = await Promise.all([api(`/v1/customers/${id}/balance`), api(`/v1/customers/${id}/status`)]);
    $("balance").textContent = `${cents(bal.available)} ${(bal.currency || "").toUpperCase()}`;
    $("balance").dataset.exact = bal.available;
    $("status").textContent = st.allowed ? "active: requests allowed" : `${st.status}${st.reason ? ` (${st.reason})` : ""}`;
    const allowances = bal.allowances || st.allowances;
    if (Array.isArray(allowances) && allowances.length) renderAllowances(allowances);
  } catch (e) {
    $("balance").textContent = "—";
    $("status").textContent = e.status === 404 ? "no prepaid credit" : `balance unavailable (${e.message})`;
  }
}

// Allowances come with plans: shown when the status payload carries them, skipped otherwise.
function renderAllowances(list) {
  const box = $("allowances");
  box.replaceChildren(el("h3", {}, "Allowances"));
  for (const a of list) {
    const name = a.name || a.id || a.allowance_id || a.meter || a.model || "allowance";
    const included = Number(a.included), used = Number(a.used);
    const pct = included > 0 ? Math.min(100, (used / included) * 100) : 0;
    box.append(el("div", { class: "allowance", "data-allowance": name, "data-used": a.used, "data-included": a.included },
      el("div", {}, `${name}: ${a.used} of ${a.included} used`
      + (a.remaining !== undefined ? `, ${a.remaining} left` : "") + (a.pct !== undefined ? ` (${a.pct} %)` : "")),
      el("div", { class: "meter" }, el("div", { style: `width:${pct.toFixed(1)}%` }))));
  }
}

// "Your bill on other plans": the simulator (GET /v1/customers/{id}/simulate) over every published
// plan, for this month or the picked YYYY-MM[..YYYY-MM]. Money is shown as the API's exact strings.
async function loadPlans(customer, period) {
  const box = $("plans"), chart = $("plans-chart");
  box.replaceChildren();
  chart.replaceChildren();
  const month = /^\d{4}-\d{2}(\.\.\d{4}-\d{2})?$/.test(period) ? period : new Date().toISOString().slice(0, 7);
  $("plans-period").textContent = `Period ${month}: what this usage would have cost on each plan (the simulator).`;
  try {
    const { plans } = await api("/v1/console/plans");
    if (!plans.length) { box.append(el("p", { class: "muted" }, "No plans are published.")); return; }
    const doc = await api(`/v1/customers/${encodeURIComponent(customer)}/simulate?period=${encodeURIComponent(month)}`
                          + `&plans=${encodeURIComponent(plans.join(","))}`);
    const mine = (doc.customers || []).find((c) => c.customer_id === customer);
    if (!mine) { box.append(el("p", { class: "muted" }, "No usage in this period to simulate.")); return; }
    const cur = ` ${(doc.currency || "").toUpperCase()}`;
    // The customer's own plan is asked for too (every published plan is): show it once, as "your plan".
    const current = mine.candidates.find((c) => c.role === "current");
    const cands = mine.candidates.filter((c) => !(c.role === "plan" && current && c.plan === current.plan));
    const rows = cands.map((c) => [
      c.plan + (c.role === "current" ? " (your plan)" : c.role === "payg" ? " (pay per token)" : "")
        + (c.plan === mine.cheapest ? " ★ cheapest" : ""),
      c.total + cur, c.fee + cur, c.overage + cur, String(c.unused_included_tokens),
      c.effective_per_million === null || c.effective_per_million === undefined ? "—" : c.effective_per_million + cur]);
    const t = table(["plan", "total", "fee", "overage", "unused included tokens", "effective per 1M tokens"], rows);
    t.querySelectorAll("tbody tr").forEach((tr, i) => {
      const c = cands[i];
      tr.dataset.plan = c.plan;
      tr.dataset.role = c.role;
      if (c.plan === mine.cheapest) tr.classList.add("cheapest");
    });
    box.append(t);
    hbars(chart, cands.map((c) => [c.plan, c.total]), doc.currency || "");
    chart.querySelectorAll("text.value").forEach((x) => { x.textContent = `${cands.find((c) => c.plan === x.dataset.label).total}${cur}`; });
    chart.querySelectorAll("rect.bar").forEach((r) => { if (r.dataset.label === mine.cheapest) r.classList.add("cheapest"); });
    if (current && Array.isArray(current.allowances) && current.allowances.length && !$("allowances").childElementCount) {
      renderAllowances(current.allowances.map((a) => ({ name: `${current.plan} · ${a.id}`, included: a.included, used: a.used,
                                                     remaining: a.unused, pct: a.utilisation_pct })));
    }
  } catch (e) {
    box.replaceChildren(el("p", { class: "error" }, `plan comparison unavailable (${e.message})`));
  }
}

async function loadSpend(q) {
  const doc = await api(`/v1/console/spend?${q}`);
  $("spend-period").textContent = `${doc.start} – ${doc.end} (end exclusive, UTC)`;
  const currencies = Object.keys(doc.currency);
  const cur = currencies[0];
  const c = cur ? doc.currency[cur] : { total: "0", by_day: {}, by_model: {}, by_project: {} };
  $("spend-total").textContent = `${cents(c.total)} ${(cur || "").toUpperCase()}`;
  $("spend-total").dataset.exact = c.total;
  dayColumns($("chart-day"), c.by_day, doc.start, doc.end, cur || "");
  hbars($("chart-model"), Object.entries(c.by_model), cur || "");
  hbars($("chart-project"), Object.entries(c.by_project), cur || "");
}

async function loadAlerts(customer) {
  const box = $("alerts");
  try {
    const doc = await api(`/v1/console/alerts?customer_id=${encodeURIComponent(customer)}`);
    box.replaceChildren(doc.alerts.length
      ? table(["when (UTC)", "kind", "message"], doc.alerts.map((a) => [new Date(a.at_ms).toISOString().slice(0, 19).replace("T", " "), a.kind, a.message]))
      : el("p", { class: "muted" }, "No alerts."));
  } catch (e) {
    box.replaceChildren(el("p", { class: "error" }, `alerts unavailable (${e.message})`));
  }
}

async function showStatement() {
  const period = $("period").value.trim();
  const html = await api(`/v1/console/statement?customer_id=${encodeURIComponent(current)}${period ? `&period=${encodeURIComponent(period)}` : ""}`);
  const frame = $("statement");
  frame.srcdoc = html;
  frame.hidden = false;
}

async function loadOperator() {
  $("operator").hidden = false;
  const doc = await api("/v1/console/customers");
  const body = $("customers").querySelector("tbody");
  body.replaceChildren(...doc.customers.map((c) => {
    const row = el("tr", { class: "clickable", "data-customer": c.customer_id },
      ...[c.customer_id, c.currency.toUpperCase(), c.events.toLocaleString("en-US"), cents(c.cost), cents(c.charge), cents(c.margin), c.last_day]
        .map((v) => el("td", {}, v)));
    row.addEventListener("click", () => showCustomer(c.customer_id));
    return row;
  }));
  await Promise.all([loadPipeline(), loadDeadLetters()]);
}

// 850 -> "850 ms", 12345 -> "12.3 s", 7260000 -> "2.0 h" (back-dated events make long ones).
function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 7200000) return `${(ms / 60000).toFixed(1)} min`;
  return `${(ms / 3600000).toFixed(1)} h`;
}

async function loadPipeline() {
  const p = await api("/v1/console/pipeline");
  const box = $("pipeline");
  const last = p.last_15_minutes;
  const lag = Object.entries(p.consumer_lag || {});
  box.replaceChildren(
    table(["last 15 minutes", "value"], [
      ["events priced", last.events.toLocaleString("en-US")],
      ["occurred → priced, avg / max", `${duration(last.occurred_to_priced_ms.avg)} / ${duration(last.occurred_to_priced_ms.max)}`],
      ["sink delay priced → row, avg / max", `${duration(last.priced_to_row_ms.avg)} / ${duration(last.priced_to_row_ms.max)}`],
      ["open dead letters", String(p.open_dead_letters)],
    ]),
    el("h3", {}, "Throughput (events priced per minute, last hour)"));
  const perMinute = Object.fromEntries(p.throughput_per_minute.map((m) => [m.minute.slice(11, 16), String(m.events)]));
  const chart = el("div", { class: "chart", id: "chart-throughput" });
  box.append(chart);
  hbars(chart, Object.entries(perMinute), "");
  chart.querySelectorAll("text.value").forEach((t) => { t.textContent = perMinute[t.dataset.label] + " events"; });
  box.append(el("h3", {}, "Consumer lag (records behind, from the workers)"),
    lag.length ? table(["worker · topic:partition", "records"], lag.map(([k, v]) => [k, String(v)]))
               : el("p", { class: "muted" }, "No lag reported (workers caught up, or no worker metrics)."));
}

async function loadDeadLetters() {
  const d = await api("/v1/console/dead-letters");
  const box = $("dead-letters");
  box.replaceChildren(el("p", {}, `${d.open} open dead letter(s).`));
  if (d.by_reason.length) {
    box.append(table(["reason", "open", "re-drivable", ""], d.by_reason.map((r) => [r.reason_code, String(r.open), String(r.redrivable), ""])));
    box.querySelectorAll("tbody tr").forEach((tr, i) => {
      const r = d.by_reason[i];
      if (!r.redrivable) return;
      const b = el("button", { "data-reason": r.reason_code }, "Re-drive");
      b.addEventListener("click", async () => {
        b.disabled = true;
        const res = await api("/v1/console/dead-letters/redrive", { method: "POST", headers: { "Content-Type": "application/json" },
                                                                   body: JSON.stringify({ reason: r.reason_code }) });
        b.replaceWith(`re-drove ${res.redriven}`);
      });
      tr.lastChild.append(b);
    });
    box.append(el("h3", {}, "Latest"), table(["failed at", "customer", "event", "reason", "detail"],
      d.latest.map((x) => [x.failed_at, x.customer_id, x.event_id, x.reason_code, x.reason])));
  }
}

async function start() {
  const key = sessionStorage.getItem(KEY);
  if (!key) { $("login").hidden = false; return; }
  try {
    me = await api("/v1/console/me");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    $("login").hidden = false;
    $("login-error").textContent = e.status === 401 ? "That key is not valid (or was revoked)." : e.message;
    return;
  }
  $("login").hidden = true;
  $("logout").hidden = false;
  $("who").textContent = me.role === "admin" ? `· operator (${me.key_prefix})` : `· ${me.customer_id} (${me.key_prefix})`;
  if (me.role === "admin") await loadOperator();
  else await showCustomer(me.customer_id);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").hidden = true;
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    start();
  });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });
  $("period-form").addEventListener("submit", (ev) => { ev.preventDefault(); if (current) showCustomer(current); });
  $("show-statement").addEventListener("click", () => showStatement());
  start();
});
