// Recordings and replay: the recorded video in a <video> element, and the recorded events (read from the
// event log by the server) drawn over it on a canvas, frame by frame, wherever the operator seeks.

import { Trails, colorFor, drawDetections, rgb } from "./overlay.js";

const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "unknown time");
const size = (bytes) => (bytes > 1 << 20 ? `${(bytes / (1 << 20)).toFixed(1)} MiB` : `${Math.ceil(bytes / 1024)} KiB`);

export async function renderRecordings(view, h) {
  view.replaceChildren(h("p", { class: "muted" }, "loading recordings…"));
  const reply = await fetch("/api/recordings");
  const body = await reply.json();
  const sections = Object.entries(body.recordings || {}).map(([stream, items]) => h("section", {},
    h("h2", {}, stream),
    items.length ? h("table", { "data-recordings": stream },
      h("thead", {}, h("tr", {}, h("th", {}, "started"), h("th", {}, "kind"), h("th", {}, "size"), h("th", {}, ""))),
      h("tbody", {}, items.map((item) => h("tr", { "data-recording": item.id },
        h("td", { class: "time" }, when(item.started)),
        h("td", {}, item.kind === "segment" ? "camera video segment" : item.kind === "run" ? "file run" : "events"),
        h("td", {}, size(item.size)),
        h("td", {}, item.video
          ? h("a", { href: `#/replay/${encodeURIComponent(stream)}/${encodeURIComponent(item.id)}` }, "Replay")
          : h("span", { class: "muted" }, item.note || "no video"))))))
      : h("p", { class: "muted" }, "Nothing recorded yet.")));
  view.replaceChildren(h("div", { class: "recordings panel" }, sections.length ? sections
    : h("p", { class: "muted" }, "Recording is off ([record] enabled = false).")));
}

// The detections event to show at a media time: the last one at or before it (boxes stay until the next
// processed frame, as they did live).
function lastAtOrBefore(keys, value) {
  let lo = 0, hi = keys.length - 1, found = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (keys[mid] <= value) { found = mid; lo = mid + 1; } else hi = mid - 1;
  }
  return found;
}

export async function renderReplay(view, h, stream, recording) {
  const base = `/api/recordings/${encodeURIComponent(stream)}/${encodeURIComponent(recording)}`;
  view.replaceChildren(h("p", { class: "muted" }, "loading the recording…"));
  const reply = await fetch(`${base}/events`);
  const body = await reply.json();
  if (!reply.ok) {
    view.replaceChildren(h("p", { class: "reply error" }, body.error || `HTTP ${reply.status}`));
    return;
  }
  const detections = body.events.filter((e) => e.kind === "detections");
  const keyOf = body.align === "pts" ? (e) => e.pts : (e) => e.ts - body.start;
  detections.sort((a, b) => keyOf(a) - keyOf(b));
  const keys = detections.map(keyOf);
  const frameStep = keys.length > 1 ? Math.max(1e-3, (keys[keys.length - 1] - keys[0]) / (keys.length - 1)) : 0.1;

  const video = h("video", { controls: "", muted: "", playsinline: "", preload: "auto", src: `${base}/video`,
                             "data-replay": recording });
  video.muted = true;
  const canvas = h("canvas", { class: "overlay", "data-stream": stream, "data-replay-overlay": "" });
  const info = h("div", { class: "figures" });
  const draw = (mediaTime) => {
    if (!video.videoWidth) return;
    if (canvas.width !== video.videoWidth || canvas.height !== video.videoHeight) {
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
    }
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    // Half a frame of slack: a frame's media time and its event's pts are the same number, rounded differently.
    const index = lastAtOrBefore(keys, mediaTime + frameStep / 2);
    if (index < 0 || mediaTime - keys[index] > 3 * frameStep) {
      canvas.dataset.frame = -1;
      canvas.dataset.boxes = 0;
      info.textContent = `${mediaTime.toFixed(2)} s · no events`;
      return;
    }
    const event = detections[index];
    const trails = new Trails();
    for (const earlier of detections.slice(Math.max(0, index - 20), index + 1)) trails.add(earlier);
    drawDetections(ctx, event, trails.upTo(event.frame));
    canvas.dataset.frame = event.frame;
    canvas.dataset.boxes = event.detections.length;
    canvas.dataset.mediaTime = mediaTime.toFixed(3);
    info.textContent = `${mediaTime.toFixed(2)} s · frame ${event.frame} · ${event.detections.length} boxes · `
      + `prompt “${event.prompt}”`;
  };
  const onFrame = (now, metadata) => {
    draw(metadata.mediaTime);
    video.requestVideoFrameCallback(onFrame);
  };
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) video.requestVideoFrameCallback(onFrame);
  else video.addEventListener("timeupdate", () => draw(video.currentTime));
  video.addEventListener("seeked", () => draw(video.currentTime));
  video.addEventListener("loadeddata", () => draw(video.currentTime));

  const tracks = body.events.filter((e) => e.kind === "track" && e.event !== "updated");
  const trackList = h("ul", { class: "timeline" }, tracks.map((e) => h("li", {},
    h("span", { class: "swatch", style: `background:${rgb(colorFor(e.track_id))}` }),
    h("a", { href: "#", onclick: (click) => {
      click.preventDefault();
      const target = body.align === "pts" ? e.ts : e.ts - body.start;
      video.currentTime = Math.max(0, target);
    } }, `${(body.align === "pts" ? e.ts : e.ts - body.start).toFixed(1)} s`),
    h("span", {}, `#${e.track_id} ${e.phrase} ${e.event}`))));
  view.replaceChildren(h("div", { class: "replay" },
    h("section", { class: "panel" }, h("h2", {}, `${stream}: ${recording}`),
      h("div", { class: "screen" }, video, canvas), info,
      h("p", { class: "muted" }, `${detections.length} recorded frames of events; boxes drawn from the event log.` +
        (body.truncated ? ` Only the first ${body.events.length} events of this run are shown (a long run).` : ""))),
    h("aside", { class: "panel" }, h("h3", {}, "Tracks (click to jump)"), trackList)));
}
