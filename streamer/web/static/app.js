// The operator's console: a grid of live streams, a page per stream (live view, prompt, track timeline), the
// events list, and recordings with replay. Everything live comes over one Server-Sent Events connection.

import { LiveConnection, decodePreview } from "./live.js";
import { Trails, colorFor, drawDetections, rgb } from "./overlay.js";
import { renderRecordings, renderReplay } from "./replay.js";

const MAX_EVENTS = 500, MAX_TIMELINE = 200, KEEP_FRAMES = 120, LATENCY_SAMPLES = 100;
const PER_FRAME = new Set(["detections", "heartbeat"]);

const state = {
  streams: new Map(),        // id -> {id, source, prompt, heartbeat, status, recording_video}
  events: [],                // newest last: track/status/error/... (not detections/heartbeats)
  detections: new Map(),     // id -> Map(frame -> detections event), the latest KEEP_FRAMES
  trails: new Map(),         // id -> Trails
  frames: new Map(),         // id -> {bitmap, header}: the preview on screen
  latency: new Map(),        // id -> [decode-to-screen ms]
  screens: new Map(),        // id -> Set(canvas) showing that stream now
  viewer: {},                // this connection's drop counters
  canChangePrompts: false,
  daemonSilent: null,
};
// For people debugging the page, and for the browser tests and benchmark, which read what is on screen.
window.groundwatch = { state, colorFor };

const view = document.getElementById("view");
const connection = document.getElementById("connection");
let connectionState = "connecting";
let route = { name: "streams" };
let eventsFilter = { stream: "", kind: "", phrase: "" };

const live = new LiveConnection({
  onState(next) { connectionState = next; renderConnection(); },
  onHello(snapshot) {
    // A new connection may be to a restarted daemon, whose frame indices start again at 0: forget the old run's
    // boxes and trails so they are never drawn over the new run's pictures.
    state.detections.clear();
    state.trails.clear();
    for (const [id, beat] of Object.entries(snapshot.heartbeats || {})) streamState(id).heartbeat = beat;
    for (const [id, status] of Object.entries(snapshot.statuses || {})) applyStatus(streamState(id), status);
    const seen = new Set(state.events.map(eventKey));
    for (const event of snapshot.recent || []) if (!seen.has(eventKey(event))) state.events.push(event);
    state.events.sort((a, b) => a.wall - b.wall);
    state.daemonSilent = snapshot.daemon_silent_seconds;
    refreshAll();
  },
  onViewer(counters) { state.viewer = counters; renderConnection(); },
  onEvent: handleEvent,
  onPreview: handlePreview,
});

function eventKey(e) { return `${e.stream}/${e.seq}/${e.wall}`; }

function streamState(id) {
  if (!state.streams.has(id)) state.streams.set(id, { id, source: "", prompt: "" });
  return state.streams.get(id);
}

// A change of settings is not a change of state: the status that said why a stream is in its state stays shown
// (streamer/events.py SETTINGS_REASONS).
const SETTINGS_REASONS = new Set(["prompt_changed", "rules_changed", "zones_changed"]);

function applyStatus(stream, event) {
  if (event.reason === "prompt_changed" && event.prompt) stream.prompt = event.prompt;
  const previous = stream.status;
  if (previous && SETTINGS_REASONS.has(event.reason) && previous.state === event.state) return;
  stream.status = event;
}

// -- live data ---------------------------------------------------------------------------------------------

function handleEvent(event) {
  const stream = streamState(event.stream);
  stream.lastEventAt = performance.now();
  if (route.name === "events" && matches(event)) prependEventRow(event);
  if (event.kind === "detections") {
    let frames = state.detections.get(event.stream);
    if (!frames) { frames = new Map(); state.detections.set(event.stream, frames); }
    frames.set(event.frame, event);
    if (frames.size > KEEP_FRAMES) frames.delete(frames.keys().next().value);
    if (!state.trails.has(event.stream)) state.trails.set(event.stream, new Trails());
    state.trails.get(event.stream).add(event);
    stream.prompt = event.prompt;
    const shown = state.frames.get(event.stream);
    if (shown && shown.header.frame === event.frame) paint(event.stream);  // its boxes came after the picture
    return;
  }
  if (event.kind === "heartbeat") {
    stream.heartbeat = event;
    renderFigures(event.stream);
    return;
  }
  if (event.kind === "status") {
    applyStatus(stream, event);
    if (event.reason === "prompt_changed") state.trails.get(event.stream)?.clear();
    renderFigures(event.stream);
  }
  state.events.push(event);
  if (state.events.length > 5 * MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
  if (route.name === "stream" && route.stream === event.stream && onTimeline(event)) prependTimeline(event);
}

async function handlePreview({ header, jpeg, cached }) {
  let bitmap;
  try { bitmap = await decodePreview(jpeg); } catch (err) { return; }
  const previous = state.frames.get(header.stream);
  if (previous && previous.header.frame > header.frame && previous.header.decoded_at >= header.decoded_at) {
    bitmap.close();  // decoded out of order: never step back
    return;
  }
  previous?.bitmap.close();
  state.frames.set(header.stream, { bitmap, header });
  paint(header.stream);
  if (cached) return;  // the stream's last picture, sent to a page that just opened: not a latency sample
  const samples = state.latency.get(header.stream) || [];
  samples.push(Date.now() - header.decoded_at * 1000);  // decode in the daemon -> pixels on this screen
  if (samples.length > LATENCY_SAMPLES) samples.shift();
  state.latency.set(header.stream, samples);
  renderFigures(header.stream);
}

function paint(streamId) {
  const shown = state.frames.get(streamId);
  if (!shown) return;
  const { bitmap, header } = shown;
  const event = state.detections.get(streamId)?.get(header.frame);
  const trails = state.trails.get(streamId)?.upTo(header.frame);
  for (const canvas of state.screens.get(streamId) || []) {
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    const ctx = canvas.getContext("2d");
    ctx.drawImage(bitmap, 0, 0);
    if (event) drawDetections(ctx, event, trails);
    canvas.dataset.frame = header.frame;
    canvas.dataset.boxes = event ? event.detections.length : -1;  // -1: this frame's boxes not here yet
    canvas.closest(".screen")?.querySelector(".placeholder")?.remove();
  }
}

// -- rendering ---------------------------------------------------------------------------------------------

const h = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
};

function stateOf(stream) {
  const status = stream.status, beat = stream.heartbeat;
  let name = beat?.state || status?.state || "unknown";
  if (status && (!beat || status.wall >= beat.wall)) name = status.state;
  let reason = "";
  if (status?.state === name && name !== "online") {
    reason = status.reason || "";
    if (name === "reconnecting" && status.attempt) reason += ` (attempt ${status.attempt}, retry in ${status.retry_in} s)`;
  }
  const silentFor = beat ? Date.now() / 1000 - beat.wall : null;
  if (name !== "offline" && silentFor !== null && silentFor > 5) {
    name = "offline";
    reason = `no heartbeat for ${Math.round(silentFor)} s: the daemon is not running or not reachable`;
  }
  return { name, reason };
}

function percentile(values, p) {
  if (!values?.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

function figuresOf(stream) {
  const beat = stream.heartbeat || {};
  const screen = percentile(state.latency.get(stream.id), 0.5);
  return [
    ["fps", beat.fps ?? "–"],
    ["pipeline latency", beat.latency_ms !== undefined ? `${Math.round(beat.latency_ms)} ms` : "–"],
    ["on screen", screen !== null ? `${Math.round(screen)} ms` : "–"],
    ["dropped", beat.frames_dropped ?? "–"],
    ["reconnects", beat.reconnects ?? "–"],
    ["frames", beat.frames_processed ?? "–"],
  ];
}

function renderFigures(streamId) {
  const stream = state.streams.get(streamId);
  if (!stream) return;
  for (const node of view.querySelectorAll(`[data-figures="${CSS.escape(streamId)}"]`)) {
    node.replaceChildren(...figuresOf(stream).map(([label, value]) =>
      h("span", { "data-figure": label }, `${label} `, h("b", {}, String(value)))));
  }
  const { name, reason } = stateOf(stream);
  for (const node of view.querySelectorAll(`[data-badge="${CSS.escape(streamId)}"]`)) {
    node.dataset.state = name;
    node.textContent = name;
  }
  for (const node of view.querySelectorAll(`[data-reason="${CSS.escape(streamId)}"]`)) {
    node.textContent = reason;
    node.title = reason;
  }
  for (const node of view.querySelectorAll(`[data-prompt="${CSS.escape(streamId)}"]`)) {
    node.textContent = stream.prompt;
  }
}

function renderConnection() {
  const drops = state.viewer.previews_dropped ? ` · ${state.viewer.previews_dropped} previews dropped (slow link)` : "";
  const text = { live: "live", connecting: "connecting…", reconnecting: "reconnecting to the daemon…" };
  connection.dataset.state = connectionState;
  connection.textContent = (text[connectionState] || connectionState) + (connectionState === "live" ? drops : "");
}

function screen(streamId, large = false) {
  const canvas = h("canvas", { class: "live", "data-stream": streamId, width: 640, height: 360,
                               "aria-label": `live view of ${streamId}` });
  if (!state.screens.has(streamId)) state.screens.set(streamId, new Set());
  state.screens.get(streamId).add(canvas);
  return h("div", { class: `screen${large ? " large" : ""}` }, canvas,
           h("span", { class: "placeholder" }, "waiting for video…"));
}

function card(stream) {
  return h("article", { class: "card", "data-card": stream.id },
    h("header", {},
      h("h2", {}, h("a", { href: `#/stream/${encodeURIComponent(stream.id)}` }, stream.id)),
      h("span", { class: "badge", "data-badge": stream.id }, "…"),
      h("span", { class: "reason", "data-reason": stream.id })),
    h("a", { href: `#/stream/${encodeURIComponent(stream.id)}` }, screen(stream.id)),
    h("div", { class: "figures", "data-figures": stream.id }));
}

function renderStreams() {
  view.replaceChildren(h("div", { class: "grid" }, [...state.streams.values()].map(card)));
}

function onTimeline(event) {
  return event.kind === "track" ? event.event !== "updated" : event.kind !== "detections" && event.kind !== "heartbeat";
}

function timeOf(event) {
  const clock = new Date(event.wall * 1000).toLocaleTimeString();
  const stream = state.streams.get(event.stream);
  return stream?.source === "file" ? `${clock} · ${Number(event.ts).toFixed(1)} s` : clock;
}

function summary(event) {
  switch (event.kind) {
    case "track":
      return `#${event.track_id} ${event.phrase} ${event.event}${event.reason ? ` (${event.reason})` : ""}`;
    case "status":
      if (event.reason === "prompt_changed") return `prompt changed to “${event.prompt}”`;
      return `${event.state}${event.reason ? `: ${event.reason}` : ""}`
        + (event.attempt ? ` (attempt ${event.attempt}, retry in ${event.retry_in} s)` : "");
    case "error": return `${event.error_type}: ${event.message}`;
    case "detections":
      return `${event.detections.length} boxes${event.detections.length ? ": " : ""}`
        + event.detections.map((d) => d.phrase).join(", ");
    case "heartbeat": return `${event.state}, ${event.fps} fps, ${event.frames_processed} frames`;
    default: {
      const { v, seq, stream, kind, ts, wall, ...rest } = event;
      return JSON.stringify(rest);
    }
  }
}

function timelineItem(event) {
  const key = event.kind === "track" ? event.track_id : event.kind;
  return h("li", { "data-kind": event.kind },
    h("span", { class: "swatch", style: `background:${event.kind === "track" ? rgb(colorFor(key)) : "transparent"}` }),
    h("time", {}, timeOf(event)), h("span", {}, summary(event)));
}

function prependTimeline(event) {
  const list = view.querySelector(".timeline");
  if (!list) return;
  list.prepend(timelineItem(event));
  while (list.children.length > MAX_TIMELINE) list.lastChild.remove();
}

function renderStream(id) {
  const stream = state.streams.get(id);
  if (!stream) {
    view.replaceChildren(h("p", { class: "reply error" }, `No stream “${id}”. `, h("a", { href: "#/" }, "All streams")));
    return;
  }
  const input = h("input", { type: "text", name: "prompt", value: stream.prompt, "aria-label": "prompt",
                              placeholder: "a person . a red car ." });
  const button = h("button", { type: "submit" }, "Look for");
  const reply = h("div", { class: "reply", role: "status" });
  if (!state.canChangePrompts) {
    input.disabled = true;
    button.disabled = true;
    reply.textContent = "This token may view but not change prompts.";
  }
  const form = h("form", { class: "prompt", onsubmit: async (e) => {
    e.preventDefault();
    button.disabled = true;
    reply.className = "reply";
    reply.textContent = "encoding the prompt…";
    try {
      const answer = await fetch(`/api/streams/${encodeURIComponent(id)}/prompt`, {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ prompt: input.value }),
      });
      const body = await answer.json().catch(() => ({ error: `HTTP ${answer.status}` }));
      if (answer.ok) {
        stream.prompt = body.prompt;
        reply.className = "reply ok";
        reply.textContent = `Now looking for “${body.prompt}” (encoded in ${body.encode_ms} ms).`;
      } else {
        reply.className = "reply error";
        reply.textContent = body.error || `HTTP ${answer.status}`;
      }
    } catch (err) {
      reply.className = "reply error";
      reply.textContent = `The console cannot reach the daemon: ${err.message}`;
    } finally {
      button.disabled = !state.canChangePrompts;
    }
  } }, input, button);
  const timeline = h("ul", { class: "timeline" },
    state.events.filter((e) => e.stream === id && onTimeline(e)).slice(-MAX_TIMELINE).reverse().map(timelineItem));
  view.replaceChildren(h("div", { class: "stream-page" },
    h("section", { class: "panel" },
      h("header", { class: "title" }, h("h2", {}, id, " "), h("span", { class: "badge", "data-badge": id }),
        " ", h("span", { class: "reason", "data-reason": id })),
      screen(id, true),
      h("div", { class: "figures", "data-figures": id }),
      h("div", {}, h("span", { class: "muted" }, "Looking for: "), h("b", { "data-prompt": id }, stream.prompt)),
      form, reply),
    h("aside", { class: "panel" }, h("h3", {}, "Timeline"), timeline)));
}

function matches(event) {
  const f = eventsFilter;
  if (f.stream && event.stream !== f.stream) return false;
  if (f.kind ? event.kind !== f.kind : PER_FRAME.has(event.kind) || (event.kind === "track" && event.event === "updated")) {
    return false;
  }
  if (f.phrase) {
    const text = event.kind === "detections" ? event.detections.map((d) => d.phrase).join(" ") : String(event.phrase || "");
    if (!text.toLowerCase().includes(f.phrase.toLowerCase())) return false;
  }
  return true;
}

function eventRow(event) {
  return h("tr", { class: `kind-${event.kind}`, "data-kind": event.kind },
    h("td", { class: "time" }, timeOf(event)), h("td", {}, event.stream), h("td", {}, event.kind),
    h("td", {}, summary(event)));
}

function prependEventRow(event) {
  const body = view.querySelector("tbody.events");
  if (!body) return;
  body.prepend(eventRow(event));
  while (body.children.length > MAX_EVENTS) body.lastChild.remove();
  view.querySelector("[data-count]").textContent = `${body.children.length} shown`;
}

function renderEvents() {
  const streamSelect = h("select", { name: "stream", "aria-label": "stream" }, h("option", { value: "" }, "all streams"),
    [...state.streams.keys()].map((id) => h("option", { value: id }, id)));
  const kindSelect = h("select", { name: "kind", "aria-label": "kind" },
    h("option", { value: "" }, "tracks, states, errors"),
    ["track", "status", "error", "detections", "heartbeat"].map((k) => h("option", { value: k }, k)));
  const phraseInput = h("input", { type: "text", name: "phrase", placeholder: "phrase", "aria-label": "phrase" });
  streamSelect.value = eventsFilter.stream;
  kindSelect.value = eventsFilter.kind;
  phraseInput.value = eventsFilter.phrase;
  const body = h("tbody", { class: "events" });
  const count = h("span", { class: "muted", "data-count": "" });
  const refill = () => {
    eventsFilter = { stream: streamSelect.value, kind: kindSelect.value, phrase: phraseInput.value.trim() };
    const rows = state.events.filter(matches).slice(-MAX_EVENTS).reverse().map(eventRow);
    body.replaceChildren(...rows);
    count.textContent = `${rows.length} shown`;
  };
  for (const input of [streamSelect, kindSelect]) input.addEventListener("change", refill);
  phraseInput.addEventListener("input", refill);
  view.replaceChildren(h("div", { class: "panel" },
    h("div", { class: "filters" }, streamSelect, kindSelect, phraseInput, count),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "time"), h("th", {}, "stream"), h("th", {}, "kind"),
      h("th", {}, "what"))), body)));
  refill();
}

// -- routing -------------------------------------------------------------------------------------------------

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  switch (parts[0]) {
    case "stream": return { name: "stream", stream: parts[1] };
    case "events": return { name: "events" };
    case "recordings": return { name: "recordings" };
    case "replay": return { name: "replay", stream: parts[1], recording: parts[2] };
    default: return { name: "streams" };
  }
}

function render() {
  route = parseRoute();
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === route.name
      || (link.dataset.nav === "streams" && route.name === "stream")
      || (link.dataset.nav === "recordings" && route.name === "replay"));
  }
  state.screens.clear();
  if (route.name === "streams") renderStreams();
  else if (route.name === "stream") renderStream(route.stream);
  else if (route.name === "events") renderEvents();
  else if (route.name === "recordings") renderRecordings(view, h);
  else if (route.name === "replay") renderReplay(view, h, route.stream, route.recording);
  live.wants([...state.screens.keys()]);
  for (const id of state.streams.keys()) { renderFigures(id); paint(id); }
}

function refreshAll() {
  for (const id of state.streams.keys()) renderFigures(id);
  if (route.name === "events") renderEvents();
}

async function loadStreams() {
  const reply = await fetch("/api/streams", { headers: { accept: "application/json" } });
  if (reply.status === 401) { location.reload(); return; }
  const body = await reply.json();
  state.canChangePrompts = body.can_change_prompts;
  for (const info of body.streams) {
    const stream = streamState(info.id);
    Object.assign(stream, { source: info.source, prompt: info.prompt || stream.prompt,
                            recording_video: info.recording_video });
  }
}

window.addEventListener("hashchange", render);
setInterval(() => { for (const id of state.streams.keys()) renderFigures(id); }, 1000);

(async () => {
  for (let delay = 500; ; delay = Math.min(delay * 2, 10000)) {
    try { await loadStreams(); break; } catch (err) {
      connectionState = "reconnecting";
      renderConnection();
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
  render();
})();
