// tandem demo: create a stream, follow its events_url with EventSource, show the pacing.
// Plain JavaScript, no build step. State is kept in `S` (exposed as window.tandemDemo for tests).
"use strict";

const COLORS = { slow: "#b45309", flush: "#dc2626", b: "#2563eb", mark: "#7c3aed", drop: "#6b7280", axis: "#a8a29e", text: "#57534e", grid: "#f5f5f4" };
const $ = (id) => document.getElementById(id);

const S = {
  handles: null,     // {id, events_url, status_url} of the POST response (the token stays in the URLs)
  es: null,          // the current EventSource
  t0: 0,             // performance.now() when Start was pressed
  lastId: null,      // last SSE id received: what a resume sends back
  seen: new Set(),   // ids received, to prove resume repeats nothing
  duplicates: 0,
  resumes: 0,
  connections: 0,
  phase: null,       // this connection's pacing phase
  flushAt: null,     // seconds since start when B's completion reached us (phase "flush")
  firstDelta: null,
  deltas: [],        // {t, source, phase, n}: n = 1-based count within its source
  marks: [],         // {t, kind: "flush" | "drop" | "resume" | "bdone"}
  text: { a: "", b: "" },
  count: { a: 0, b: 0 },
  ended: false,
  status: null,      // the `end` event's status
  statusDoc: null,   // GET status_url after `end`
  reopenTimer: null,
};

function now() { return (performance.now() - S.t0) / 1000; }

function log(msg) {
  const li = document.createElement("li");
  li.textContent = `${now().toFixed(2)}s  ${msg}`;
  $("log").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
}

function chip(el, value) {
  el.textContent = value ?? "-";
  el.className = "chip " + (value ?? "");
}

function num(id) { return Number($(id).value || 0); }

function requestBody() {
  const bText = $("b-text-option").value;
  const b = { delay_ms: num("b-delay"), interval_ms: num("b-interval") };
  if (bText) b.text = bText; else b.tokens = num("b-tokens");
  return {
    prompt: $("prompt").value,
    a: { task: "simulated", options: { tokens: num("a-tokens"), interval_ms: num("a-interval") } },
    b: { task: "simulated", options: b },
    pacing: { slow_interval_ms: num("slow"), b_interval_ms: num("b-spacing") },
  };
}

function reset() {
  if (S.es) S.es.close();
  clearTimeout(S.reopenTimer);
  Object.assign(S, {
    handles: null, es: null, t0: performance.now(), lastId: null, seen: new Set(), duplicates: 0, resumes: 0,
    connections: 0, phase: null, flushAt: null, firstDelta: null, deltas: [], marks: [], text: { a: "", b: "" },
    count: { a: 0, b: 0 }, ended: false, status: null, statusDoc: null, reopenTimer: null,
  });
  for (const id of ["a-text", "b-text", "log"]) $(id).replaceChildren();
  for (const id of ["phase", "status", "a-state", "b-state"]) chip($(id), null);
  for (const id of ["first-delta", "flush-at", "stream-id"]) $(id).textContent = "-";
  for (const id of ["resumes", "duplicates", "a-count", "b-count"]) $(id).textContent = "0";
  chip($("conn"), "closed");
  draw();
}

async function start(ev) {
  ev.preventDefault();
  reset();
  $("start").disabled = true;
  try {
    const r = await fetch("/v1/streams", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()) });
    const doc = await r.json();
    if (r.status !== 201) {
      const err = doc.error || {};
      log(`create failed: ${r.status} ${err.code}: ${err.message}`);
      chip($("status"), "error");
      return;
    }
    S.handles = doc;
    $("stream-id").textContent = doc.id;
    log(`created stream ${doc.id}`);
    connect(doc.events_url);
  } catch (e) {
    log(`create failed: ${e}`);
  } finally {
    $("start").disabled = false;
  }
}

// -- the event stream ----------------------------------------------------------------------------

function connect(url) {
  const es = new EventSource(url);
  S.es = es;
  S.connections += 1;
  S.phase = null;
  chip($("conn"), "connecting");
  es.onopen = () => { chip($("conn"), "open"); $("drop").disabled = false; };
  es.addEventListener("meta", (e) => {
    const m = JSON.parse(e.data);
    chip($("status"), m.status);
    chip($("a-state"), m.a.state);
    chip($("b-state"), m.b.state);
    log(`meta: status ${m.status}, A ${m.a.state}, B ${m.b.state}` + (S.connections > 1 ? " (resumed connection)" : ""));
  });
  es.addEventListener("phase", (e) => onPhase(JSON.parse(e.data).phase));
  es.addEventListener("delta", (e) => onDelta(e));
  es.addEventListener("done", (e) => onTerminal(e, "done"));
  // An `error` *event* of the stream is a MessageEvent with data; a connection error is a plain Event.
  es.addEventListener("error", (e) => {
    if (e instanceof MessageEvent && e.data) { onTerminal(e, "error"); return; }
    if (S.ended || es !== S.es) return;
    chip($("conn"), es.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
    log("connection error: the browser reconnects by itself, with Last-Event-ID");
  });
  es.addEventListener("end", (e) => onEnd(e));
}

function remember(e) {
  if (!e.lastEventId) return true;
  if (S.seen.has(e.lastEventId)) {
    S.duplicates += 1;
    $("duplicates").textContent = S.duplicates;
    return false;
  }
  S.seen.add(e.lastEventId);
  S.lastId = e.lastEventId;
  return true;
}

function onPhase(phase) {
  S.phase = phase;
  chip($("phase"), phase);
  log(`phase: ${phase}`);
  if (phase === "flush" && S.flushAt === null) {
    S.flushAt = now();
    S.marks.push({ t: S.flushAt, kind: "flush" });
    $("flush-at").textContent = `${S.flushAt.toFixed(2)} s`;
    const mark = document.createElement("span");
    mark.className = "flush-mark";
    mark.title = `B completed at ${S.flushAt.toFixed(2)} s: A's backlog is flushed`;
    $("a-text").appendChild(mark);
    bDoneMark();
    chip($("b-state"), "done");
  }
  draw();
}

function bDoneMark() {
  if (document.querySelector("#b-text .b-done-mark")) return;
  const mark = document.createElement("div");
  mark.className = "b-done-mark";
  mark.title = `B completed; noticed at ${now().toFixed(2)} s`;
  $("b-text").prepend(mark);
}

function onDelta(e) {
  if (!remember(e)) return;
  const d = JSON.parse(e.data);
  const t = now();
  const src = d.source;
  if (S.firstDelta === null) {
    S.firstDelta = t;
    $("first-delta").textContent = `${Math.round(t * 1000)} ms`;
  }
  const phase = src === "a" ? (S.phase === "flush" ? "flush" : "slow") : "b";
  S.count[src] += 1;
  S.text[src] += d.text;
  S.deltas.push({ t, source: src, phase, n: S.count[src] });
  const span = document.createElement("span");
  span.className = `${phase} fresh`;
  span.textContent = d.text;
  $(`${src}-text`).appendChild(span);
  setTimeout(() => span.classList.remove("fresh"), 400);
  $(`${src}-count`).textContent = S.count[src];
  if (src === "b") chip($("b-state"), "done");  // B's deltas only come once A is done and B has output
  scheduleDraw();
}

function onTerminal(e, kind) {
  if (!remember(e)) return;
  const d = JSON.parse(e.data);
  const state = kind === "done" ? "done" : (d.code === "cancelled" ? "cancelled" : "failed");
  chip($(`${d.source}-state`), state);
  if (kind === "done") log(`done: ${d.source.toUpperCase()}, ${d.tokens} tokens`);
  else log(`error: ${d.source} ${d.code}: ${d.message}`);
  if (d.source === "b") bDoneMark();
}

async function onEnd(e) {
  remember(e);
  const d = JSON.parse(e.data);
  S.ended = true;
  S.status = d.status;
  S.es.close();
  clearTimeout(S.reopenTimer);
  $("drop").disabled = true;
  chip($("conn"), "closed");
  chip($("status"), d.status);
  chip($("phase"), "end");
  log(`end: ${d.status}; ${S.count.a} A and ${S.count.b} B deltas, ${S.resumes} resume(s), ${S.duplicates} duplicate(s)`);
  draw();
  try {
    const r = await fetch(S.handles.status_url);
    S.statusDoc = await r.json();
    const same = S.statusDoc.a.text === S.text.a && S.statusDoc.b.text === S.text.b;
    log(same ? "status document: both texts match what was shown" : "status document: texts DIFFER from what was shown");
  } catch (err) {
    log(`status: ${err}`);
  }
}

// -- drop and resume -----------------------------------------------------------------------------

function drop() {
  if (!S.es || S.ended) return;
  S.es.close();
  $("drop").disabled = true;
  chip($("conn"), "dropped");
  const at = S.lastId;
  S.marks.push({ t: now(), kind: "drop" });
  log(`dropped the connection after ${at ?? "no event"}; resuming in 0.7 s`);
  const pane = S.count.b > 0 || S.phase === "waiting" || S.phase === "b" ? "b-text" : "a-text";
  const mark = document.createElement("span");
  mark.className = "resume-mark";
  mark.title = `dropped after ${at}`;
  $(pane).appendChild(mark);
  draw();
  S.reopenTimer = setTimeout(() => {
    // A new EventSource cannot set Last-Event-ID, so the id goes in the query string.
    const url = S.handles.events_url + (at ? `&last_event_id=${encodeURIComponent(at)}` : "");
    S.resumes += 1;
    $("resumes").textContent = S.resumes;
    S.marks.push({ t: now(), kind: "resume" });
    log(`resuming with last_event_id=${at}`);
    connect(url);
  }, 700);
}

// -- the timeline --------------------------------------------------------------------------------

let drawPending = false;
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; draw(); });
}

function draw() {
  const canvas = $("timeline");
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 960, cssH = canvas.clientHeight || 260;
  if (canvas.width !== Math.round(cssW * dpr)) { canvas.width = Math.round(cssW * dpr); canvas.height = Math.round(cssH * dpr); }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, cssW, cssH);
  const L = 34, R = 12, T = 8, B = 22, gap = 14;
  const plotW = cssW - L - R;
  const laneH = (cssH - T - B - gap) / 2;
  const lanes = { a: T, b: T + laneH + gap };
  const tEnd = Math.max(3, ...S.deltas.map((d) => d.t), ...S.marks.map((m) => m.t)) * 1.05;
  const x = (t) => Math.round(L + (t / tEnd) * plotW);

  // lanes, grid and axis
  g.font = "11px system-ui, sans-serif";
  for (const src of ["a", "b"]) {
    g.fillStyle = COLORS.grid;
    g.fillRect(L, lanes[src], plotW, laneH);
    g.fillStyle = src === "a" ? COLORS.slow : COLORS.b;
    g.fillText(src.toUpperCase(), 8, lanes[src] + laneH / 2 + 4);
  }
  g.fillStyle = COLORS.text;
  const step = tEnd > 20 ? 5 : tEnd > 8 ? 2 : tEnd > 4 ? 1 : 0.5;
  for (let t = 0; t <= tEnd; t += step) {
    g.fillStyle = COLORS.axis;
    g.fillRect(x(t), cssH - B, 1, 4);
    g.fillStyle = COLORS.text;
    g.fillText(`${+t.toFixed(1)}s`, x(t) - 8, cssH - 6);
  }

  // marks: flush (solid), drop/resume (dashed)
  for (const m of S.marks) {
    if (m.kind === "flush") {
      g.fillStyle = COLORS.mark;
      g.fillRect(x(m.t) - 1, T, 2, cssH - T - B);
      g.fillText("B done \u2192 flush", x(m.t) + 4, T + 11);
    } else if (m.kind === "drop" || m.kind === "resume") {
      g.fillStyle = COLORS.drop;
      for (let y = T; y < cssH - B; y += 6) g.fillRect(x(m.t), y, 1, 3);
      g.fillText(m.kind, x(m.t) + 3, cssH - B - 4);
    }
  }

  // one square per delta: x = arrival time, y = its count within its source
  for (const src of ["a", "b"]) {
    const total = Math.max(1, S.count[src]);
    for (const d of S.deltas) {
      if (d.source !== src) continue;
      const y = Math.round(lanes[src] + laneH - (d.n / total) * (laneH - 4));
      g.fillStyle = COLORS[d.phase];
      g.fillRect(x(d.t) - 2, y - 2, 4, 4);
    }
  }
}

// For tests and the curious: how many pixels of each colour the timeline has.
function timelinePixels() {
  const canvas = $("timeline");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const want = {};
  for (const name of ["slow", "flush", "b", "mark"]) {
    const hex = COLORS[name];
    want[name] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  }
  const counts = { slow: 0, flush: 0, b: 0, mark: 0 };
  for (let i = 0; i < data.length; i += 4) {
    for (const name in want) {
      const [r, g, b] = want[name];
      if (data[i] === r && data[i + 1] === g && data[i + 2] === b && data[i + 3] === 255) counts[name] += 1;
    }
  }
  return counts;
}

window.tandemDemo = { state: S, timelinePixels, draw };
$("form").addEventListener("submit", start);
$("drop").addEventListener("click", drop);
window.addEventListener("resize", scheduleDraw);
draw();
