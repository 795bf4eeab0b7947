"""Alert clips: packets copied (remuxed, never re-encoded) from the recording into an MP4.

A clip starts at the last keyframe at or before the asked start, so it decodes from its first frame, and ends
at the first packet past the asked end. Sources are a list of (file, time of its first packet): one video file
for a file stream (media time), or the recorded MPEG-TS segments of a live stream (wall-clock time from each
segment's name, see `decoder.SegmentWriter`).
"""

from __future__ import annotations

import os
from pathlib import Path

import av


def segment_sources(video_directory: str | Path, start: float, end: float) -> list[tuple[Path, float]]:
    """The recorded segments that may hold [start, end] (wall-clock seconds), oldest first."""
    segments = []
    for path in Path(video_directory).glob("*.ts"):
        try:
            segments.append((path, int(path.stem) / 1000.0))
        except ValueError:
            continue
    segments.sort(key=lambda s: s[1])
    chosen = []
    for index, (path, began) in enumerate(segments):
        following = segments[index + 1][1] if index + 1 < len(segments) else float("inf")
        if following > start and began <= end:
            chosen.append((path, began))
    return chosen


def cut_clip(sources: list[tuple[Path, float]], output: str | Path, start: float, end: float) -> tuple[float, float]:
    """Remux the video packets covering [start, end] (seconds on the sources' clock) to `output` (MP4).

    Returns the clip's (first, last) packet times on that clock. Raises ValueError when no packet falls in
    the range; av.FFmpegError / OSError when a source cannot be read.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".part")
    kept: list[tuple[float, float, av.Packet]] = []  # (presentation, decode time, packet), decode order
    template = None
    reached = False  # a packet at or after `start` exists: a recording that ends before it has no clip
    opened = []
    try:
        for path, began in sources:
            try:
                container = av.open(str(path))
            except (av.FFmpegError, OSError):
                if len(sources) == 1:
                    raise
                continue  # a segment still empty (its first packets not flushed) or damaged: the others may cover
            opened.append(container)
            if not container.streams.video:
                continue
            stream = container.streams.video[0]
            if template is None:
                template = stream
            base = None
            if len(sources) == 1:
                base = stream.start_time or 0
                if start > began:
                    # One file: jump to the keyframe at or before the start instead of reading from the top.
                    container.seek(int((start - began) / stream.time_base) + base, stream=stream, backward=True,
                                   any_frame=False)
            done = False
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                if base is None:
                    base = packet.pts  # a segment's name is the wall-clock time of its first packet
                when = began + float((packet.pts - base) * stream.time_base)
                decoded = began + float(((packet.dts if packet.dts is not None else packet.pts) - base)
                                        * stream.time_base)
                if when < start:
                    if packet.is_keyframe:
                        kept = [(when, decoded, packet)]
                    elif kept:
                        kept.append((when, decoded, packet))
                    continue
                reached = True
                if decoded > end:
                    done = True
                    break
                if not kept and not packet.is_keyframe:
                    continue  # the recording begins after `start`: start at its first keyframe
                if when <= end:
                    kept.append((when, decoded, packet))
            if done:
                break
        if not kept or not reached:
            raise ValueError(f"no recorded video between {start:.3f} and {end:.3f}")
        with av.open(str(partial), "w", format="mp4") as out:
            out_stream = out.add_stream_from_template(template)
            time_base = template.time_base
            origin = kept[0][1]
            last_dts = None
            for when, decoded, packet in kept:
                # Rebased on the clip's first decode time, in the template's time base.
                dts = int(round((decoded - origin) / time_base))
                if last_dts is not None and dts <= last_dts:
                    dts = last_dts + 1
                last_dts = dts
                packet.dts, packet.pts = dts, max(dts, int(round((when - origin) / time_base)))
                packet.time_base = time_base
                packet.stream = out_stream
                out.mux(packet)
        os.replace(partial, output)
        return kept[0][0], max(k[0] for k in kept)
    finally:
        for container in opened:
            container.close()
        partial.unlink(missing_ok=True)


def file_pass_seconds(path: str | Path) -> float:
    """The media time one pass of a looped file stream takes, as the decoder counts it (its last frame's time plus
    one frame), so that pass k of the file runs from k times this on the stream's clock. Packets only, no decoding."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        last = max((packet.pts for packet in container.demux(stream) if packet.pts is not None), default=0)
        rate = float(stream.average_rate or 25)
        return float(last * stream.time_base) + 1.0 / rate
