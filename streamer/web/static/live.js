// The page's one live connection: Server-Sent Events from /api/live, reconnecting by itself.
// EventSource retries on its own after a dropped connection; after a refused one (the daemon is restarting, or
// the console's process is) it gives up, so we open a new one with a growing delay. A 401 means the token
// cookie is gone: reloading shows the sign-in form.

export class LiveConnection {
  constructor({ onEvent, onPreview, onHello, onViewer, onState }) {
    Object.assign(this, { onEvent, onPreview, onHello, onViewer, onState });
    this.previews = [];
    this.source = null;
    this.delay = 500;
    this.timer = null;
  }

  open(previews) {
    this.previews = [...previews].sort();
    this.close();
    const query = this.previews.length ? `?previews=${this.previews.map(encodeURIComponent).join(",")}` : "";
    const source = new EventSource(`/api/live${query}`);
    this.source = source;
    this.onState("connecting");
    source.onopen = () => { this.delay = 500; this.onState("live"); };
    source.addEventListener("hello", (m) => this.onHello(JSON.parse(m.data)));
    source.addEventListener("viewer", (m) => this.onViewer(JSON.parse(m.data)));
    source.addEventListener("preview", (m) => this.onPreview(JSON.parse(m.data)));
    source.onmessage = (m) => this.onEvent(JSON.parse(m.data));
    source.onerror = () => {
      if (source !== this.source) return;
      if (source.readyState === EventSource.CLOSED) this.retry();
      else this.onState("reconnecting");
    };
  }

  async retry() {
    this.onState("reconnecting");
    clearTimeout(this.timer);
    try {
      const reply = await fetch("/api/streams", { headers: { accept: "application/json" } });
      if (reply.status === 401) { location.reload(); return; }
    } catch (err) { /* the daemon is down: keep trying */ }
    this.timer = setTimeout(() => this.open(this.previews), this.delay);
    this.delay = Math.min(this.delay * 2, 10000);
  }

  wants(previews) {
    const sorted = [...previews].sort();
    if (sorted.join(",") !== this.previews.join(",") || !this.source) this.open(sorted);
  }

  close() {
    clearTimeout(this.timer);
    if (this.source) { this.source.close(); this.source = null; }
  }
}

// base64 JPEG -> ImageBitmap, decoded off the main thread.
export async function decodePreview(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return createImageBitmap(new Blob([bytes], { type: "image/jpeg" }));
}
