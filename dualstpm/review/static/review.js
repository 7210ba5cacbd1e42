// The review page: one part shown at a time, its page of the list fetched on demand,
// one POST per verdict. The order is fetched once per page load, so paging never skips a
// part; the server re-sorts (reviewed parts last) on the next load.
"use strict";

const PAGE = 50;               // parts per list page (one /api/parts request)
const state = {
  order: [],                   // part ids in review order
  parts: new Map(),            // id -> part view (from /api/parts)
  pos: 0,                      // index into order
  original: false,             // showing the original image instead of the overlay
  mask: null,                  // {name, base64} attached to the next verdict
  reviewed: 0,
};
const $ = (id) => document.getElementById(id);

function say(text, kind = "") {
  const box = $("status");
  box.textContent = text;
  box.className = `status ${kind}`;
}

async function api(url, options = {}) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const detail = body && body.detail;
    const text = typeof detail === "string" ? detail
      : Array.isArray(detail) ? detail.map((d) => d.msg).join("; ") : `${response.status} ${response.statusText}`;
    throw new Error(text);
  }
  return body;
}

async function ensurePage(page) {
  const ids = state.order.slice(page * PAGE, (page + 1) * PAGE).filter((id) => !state.parts.has(id));
  if (!ids.length) return;
  for (const part of await api(`/api/parts?ids=${ids.join(",")}`)) state.parts.set(part.id, part);
}

const current = () => state.parts.get(state.order[state.pos]);
const fmt = (x, digits = 4) => (typeof x === "number" ? x.toFixed(digits) : "–");

function tag(part) {
  const v = part.verdict ? part.verdict.verdict : null;
  return `<span class="tag ${v || "none"}">${v || "to do"}</span>`;
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function renderList() {
  const page = Math.floor(state.pos / PAGE);
  const pages = Math.max(1, Math.ceil(state.order.length / PAGE));
  const rows = state.order.slice(page * PAGE, (page + 1) * PAGE).map((id, k) => {
    const part = state.parts.get(id);
    const index = page * PAGE + k;
    return `<div class="row${index === state.pos ? " current" : ""}" data-index="${index}" data-id="${id}">` +
      `<span>${index + 1}. ${escapeHtml(part ? part.name : id)}</span>${part ? tag(part) : ""}</div>`;
  });
  $("list").innerHTML = `<div class="pager">page ${page + 1} of ${pages}</div>${rows.join("")}`;
  const row = $("list").querySelector(".row.current");
  if (row) row.scrollIntoView({ block: "nearest" });
}

function picture(part, original) {
  return `/api/parts/${part.id}/${original ? "image" : "overlay"}`;
}

function renderPart() {
  const part = current();
  $("progress").textContent = state.order.length
    ? `part ${state.pos + 1} of ${state.order.length} · ${state.reviewed} reviewed`
    : "nothing to review";
  if (!part) return;
  $("picture").src = picture(part, state.original && part.exists);
  $("picture").alt = `${state.original ? "original" : "overlay"} of ${part.path}`;
  $("name").textContent = part.path + (part.exists ? "" : "  (file no longer exists)");
  $("label").innerHTML = `<span class="${escapeHtml(part.label)}">${escapeHtml(part.label)}</span>`;
  $("normalized").textContent = fmt(part.normalized_score, 3);
  $("score").textContent = `${fmt(part.score)} / ${fmt(part.threshold)}`;
  const v = part.verdict;
  $("verdict").innerHTML = v
    ? `<span class="${v.verdict}">${v.verdict}</span> by ${escapeHtml(v.reviewer)}, ${escapeHtml(v.time)}` +
      (v.mask ? " · mask" : "") + (part.verdicts > 1 ? ` · ${part.verdicts} verdicts in the log` : "")
    : "none yet";
  $("note").value = v ? v.note : "";
  state.mask = null;
  $("mask").value = "";
  $("mask-state").textContent = "";
  const next = state.parts.get(state.order[state.pos + 1]);
  if (next) new Image().src = picture(next, false);  // the next overlay, ahead of time
}

async function go(pos) {
  if (!state.order.length) return;
  state.pos = Math.min(Math.max(pos, 0), state.order.length - 1);
  try {
    await ensurePage(Math.floor(state.pos / PAGE));
    await ensurePage(Math.floor((state.pos + 1) / PAGE));
  } catch (error) {
    say(error.message, "error");
  }
  renderList();
  renderPart();
}

async function give(verdict, advance = true) {
  const part = current();
  if (!part) return;
  const body = { verdict, note: $("note").value, mask_png: state.mask ? state.mask.base64 : null };
  say(`saving ${verdict}…`);
  try {
    const updated = await api(`/api/parts/${part.id}/verdict`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!part.verdict) state.reviewed += 1;
    state.parts.set(part.id, updated);
    say(`kept: ${part.name} is ${verdict}${body.note ? " (with note)" : ""}${body.mask_png ? " (with mask)" : ""}`, "ok");
    if (advance && state.pos < state.order.length - 1) await go(state.pos + 1);
    else { renderList(); renderPart(); }
  } catch (error) {
    say(`not recorded: ${error.message}`, "error");
  }
}

function attachMask(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.mask = { name: file.name, base64: String(reader.result).split(",", 2)[1] || "" };
    $("mask-state").textContent = `mask ${file.name} goes with the next “defective” (d)`;
  };
  reader.onerror = () => say(`cannot read ${file.name}`, "error");
  reader.readAsDataURL(file);
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target === $("note")) {
    if (event.key === "Enter") {
      event.preventDefault();
      $("note").blur();
      const part = current();
      if (part && part.verdict) give(part.verdict.verdict, false);
      else say("note kept for the verdict: press g or d");
    } else if (event.key === "Escape") {
      $("note").blur();
    }
    return;
  }
  if (event.target.tagName === "INPUT" && event.target.type === "text") return;
  const actions = {
    g: () => give("good"), d: () => give("defective"),
    n: () => $("note").focus(), m: () => $("mask").click(),
    j: () => go(state.pos + 1), ArrowRight: () => go(state.pos + 1),
    k: () => go(state.pos - 1), ArrowLeft: () => go(state.pos - 1),
    o: () => { state.original = !state.original; renderPart(); },
  };
  const action = actions[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
}

async function start() {
  $("good").addEventListener("click", () => give("good"));
  $("defective").addEventListener("click", () => give("defective"));
  $("prev").addEventListener("click", () => go(state.pos - 1));
  $("next").addEventListener("click", () => go(state.pos + 1));
  $("toggle").addEventListener("click", () => { state.original = !state.original; renderPart(); });
  $("mask").addEventListener("change", (event) => { attachMask(event.target.files[0]); event.target.blur(); });
  $("list").addEventListener("click", (event) => {
    const row = event.target.closest(".row");
    if (row) go(Number(row.dataset.index));
  });
  document.addEventListener("keydown", onKey);
  try {
    const order = await api("/api/order");
    state.order = order.order;
    state.reviewed = order.reviewed;
    if (order.unreadable.length) {
      $("unreadable").textContent = `${order.unreadable.length} row(s) of predictions.csv could not be scored and are ` +
        `not shown (see its error column): ${order.unreadable.map((u) => u.path).join(", ")}`;
    }
    await go(0);
  } catch (error) {
    say(`cannot load the parts: ${error.message}`, "error");
  }
}

start();
