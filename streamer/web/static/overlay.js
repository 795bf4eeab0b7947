// Boxes, labels and trails drawn over a picture on a canvas: the live view and the replay share this.
// Boxes are in the source frame's pixels (the `detections` event's width x height); the canvas may be smaller.

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(text) {
  let crc = 0xffffffff;
  for (const byte of new TextEncoder().encode(text)) crc = CRC_TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

// The colour of a track id (or of a phrase, for boxes without a track), as `groundwatch replay` picks it:
// golden-ratio hues, saturated, stable across runs.
export function colorFor(key) {
  const number = Number.isInteger(key) ? key : crc32(String(key));
  const hue = ((number * 0.618033988749895) % 1) * 360;
  const s = 220 / 255, v = 1;
  const c = v * s, x = c * (1 - Math.abs(((hue / 60) % 2) - 1)), m = v - c;
  const [r, g, b] = hue < 60 ? [c, x, 0] : hue < 120 ? [x, c, 0] : hue < 180 ? [0, c, x]
    : hue < 240 ? [0, x, c] : hue < 300 ? [x, 0, c] : [c, 0, x];
  return [Math.round((r + m) * 255), Math.round((g + m) * 255), Math.round((b + m) * 255)];
}

export const rgb = ([r, g, b]) => `rgb(${r}, ${g}, ${b})`;

// Track centres from detections events, for trails: {trackId: [[x, y, frame], ...]} in source pixels.
export class Trails {
  constructor(length = 20) { this.length = length; this.points = new Map(); }

  add(event) {
    for (const d of event.detections || []) {
      if (d.track_id === null || d.track_id === undefined) continue;
      const [x1, y1, x2, y2] = d.box;
      let list = this.points.get(d.track_id);
      if (!list) { list = []; this.points.set(d.track_id, list); }
      if (list.length && list[list.length - 1][2] >= event.frame) continue;
      list.push([(x1 + x2) / 2, y2, event.frame]);
      if (list.length > this.length) list.shift();
    }
    for (const [id, list] of this.points) {  // forget tracks not seen for a while
      if (event.frame - list[list.length - 1][2] > 4 * this.length) this.points.delete(id);
    }
  }

  upTo(frame) {
    const result = new Map();
    for (const [id, list] of this.points) {
      const kept = list.filter((p) => p[2] <= frame && frame - p[2] <= 2 * this.length);
      if (kept.length >= 2) result.set(id, kept);
    }
    return result;
  }

  clear() { this.points.clear(); }
}

// Draw one frame's detections (and trails) on `ctx`, scaled from the event's frame size to the canvas.
export function drawDetections(ctx, event, trails) {
  const canvas = ctx.canvas;
  const sx = canvas.width / (event.width || canvas.width), sy = canvas.height / (event.height || canvas.height);
  const thin = Math.max(1, Math.round(Math.min(canvas.width, canvas.height) / 240));
  ctx.save();
  ctx.lineJoin = "round";
  if (trails) {
    for (const [id, points] of trails) {
      ctx.strokeStyle = rgb(colorFor(id));
      ctx.lineWidth = thin;
      ctx.beginPath();
      points.forEach(([x, y], i) => (i ? ctx.lineTo(x * sx, y * sy) : ctx.moveTo(x * sx, y * sy)));
      ctx.stroke();
    }
  }
  const font = Math.max(10, Math.round(canvas.height / 26));
  ctx.font = `${font}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of event.detections || []) {
    const tracked = d.track_id !== null && d.track_id !== undefined;
    const color = rgb(colorFor(tracked ? d.track_id : d.phrase || ""));
    // Whole pixels: the edges are crisp, so what is drawn is exactly where the event says.
    const x1 = Math.round(d.box[0] * sx), y1 = Math.round(d.box[1] * sy);
    const x2 = Math.round(d.box[2] * sx), y2 = Math.round(d.box[3] * sy);
    ctx.strokeStyle = color;
    ctx.lineWidth = tracked ? 2 * thin : thin;
    const half = ctx.lineWidth % 2 ? 0.5 : 0;  // an odd width centred on a pixel's middle covers whole pixels
    ctx.strokeRect(x1 + half, y1 + half, x2 - x1, y2 - y1);
    const label = `${tracked ? "#" + d.track_id + " " : ""}${d.phrase} ${Number(d.score).toFixed(2)}`;
    const width = ctx.measureText(label).width + 6;
    const top = y1 - font - 4 >= 0 ? y1 - font - 4 : y1;
    const left = Math.max(0, Math.min(x1, canvas.width - width));  // the whole label on the canvas
    ctx.fillStyle = color;
    ctx.fillRect(left, top, width, font + 4);
    ctx.fillStyle = "#000";
    ctx.fillText(label, left + 3, top + 2);
  }
  ctx.restore();
}
