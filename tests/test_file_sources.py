"""File sources for demos and soak tests: `loop = true` and `realtime = true` (issue 11)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from streamer.config import ConfigError, parse_config
from streamer.decoder import EXIT_DONE, Decoder
from streamer.media import write_video

from fakes import FlagEvent, ListSender, frame_with_value


def run_decoder(decoder, mailbox, stop, until: int, consume_delay: float = 0.0):
    """Run `decoder` on a thread; take frames until `until` arrived (then stop it) or it ends."""
    result, got = {}, []
    thread = threading.Thread(target=lambda: result.setdefault("code", decoder.run()))
    thread.start()
    deadline = time.monotonic() + 60
    while (thread.is_alive() or mailbox.pending()) and time.monotonic() < deadline:
        for frame in mailbox.take(live=False, limit=3):
            got.append((frame.frame_index, frame.pts, int(frame.pixels[0, 0, 0]), time.monotonic()))
            mailbox.release(frame)
            time.sleep(consume_delay)
        if len(got) >= until:
            stop.set()
        time.sleep(0.001)
    thread.join(10)
    return result.get("code"), got


def test_looped_file_goes_on_with_increasing_frames_and_times(tmp_path, mailbox_factory, stats_factory):
    """A looped file starts again at its end; frame indices and media times keep growing (a stream's events
    never repeat a frame), and the pixels repeat."""
    path = write_video(tmp_path / "v.mp4", np.stack([frame_with_value(v * 40, 48, 64) for v in range(5)]), fps=10)
    mailbox, stop = mailbox_factory("loop", slots=4, width=64, height=48), FlagEvent()
    decoder = Decoder(stream_id="v", url=str(path), live=False, fps=0, max_width=64, max_height=48,
                      mailbox=mailbox, stats=stats_factory(["v"]), sender=ListSender(), stop=stop, loop=True)
    code, got = run_decoder(decoder, mailbox, stop, until=12)
    assert code == EXIT_DONE and decoder.passes >= 2
    indices = [g[0] for g in got]
    assert indices[:12] == list(range(12))
    pts = [g[1] for g in got[:12]]
    assert np.allclose(pts, np.arange(12) / 10, atol=1e-3)
    values = [g[2] for g in got[:12]]
    assert values[5:10] == values[:5] and abs(values[1] - values[0]) > 20
    assert not mailbox.finished or mailbox.end_reason != "end_of_file"  # a looped file never ends by itself


def test_a_restarted_looped_file_skips_whole_passes_without_decoding_them(tmp_path, mailbox_factory,
                                                                         stats_factory):
    """A restarted decoder goes on from the frame its dead predecessor stopped at (`first_frame`); for a file
    looping for days it decoded every earlier pass to get there (found by an audit: 3 days at 10 fps are 2.6
    million frames before the first one delivered). Whole passes are counted once one pass is known: the frame
    delivered first is the one asked for, at the media time the loop gives it, after decoding a few passes (the mailbox lets it decode ahead)."""
    path = write_video(tmp_path / "v.mp4", np.stack([frame_with_value(v * 40, 48, 64) for v in range(5)]), fps=10)
    mailbox, stop, stats = mailbox_factory("skip", slots=4, width=64, height=48), FlagEvent(), stats_factory(["v"])
    first = 5 * 200 + 3  # pass 200, its fourth frame
    decoder = Decoder(stream_id="v", url=str(path), live=False, fps=0, max_width=64, max_height=48,
                      mailbox=mailbox, stats=stats, sender=ListSender(), stop=stop, loop=True, first_frame=first)
    code, got = run_decoder(decoder, mailbox, stop, until=4)
    assert code == EXIT_DONE
    assert [g[0] for g in got[:4]] == list(range(first, first + 4))
    assert np.allclose([g[1] for g in got[:4]], np.arange(first, first + 4) / 10, atol=1e-3)
    assert abs(got[0][2] - 3 * 40) < 8  # the file's fourth frame's pixels
    assert stats.get("v", "frames_decoded") < 5 * 6, stats.get("v", "frames_decoded")  # 1000+ before


def test_unlooped_file_still_ends(tmp_path, mailbox_factory, stats_factory):
    path = write_video(tmp_path / "v.mp4", np.stack([frame_with_value(v, 48, 64) for v in range(3)]), fps=10)
    mailbox, stop = mailbox_factory("once", slots=4, width=64, height=48), FlagEvent()
    decoder = Decoder(stream_id="v", url=str(path), live=False, fps=0, max_width=64, max_height=48,
                      mailbox=mailbox, stats=stats_factory(["v"]), sender=ListSender(), stop=stop)
    code, got = run_decoder(decoder, mailbox, stop, until=100)
    assert code == EXIT_DONE and [g[0] for g in got] == [0, 1, 2] and mailbox.end_reason == "end_of_file"


def test_realtime_file_is_paced_at_its_frame_rate(tmp_path, mailbox_factory, stats_factory):
    """Without `realtime` a file is read as fast as it is processed (here: at once); with it, 8 frames at 10
    fps take at least 0.7 s from the first to the last, as from a camera. Only lower bounds are checked: a
    loaded machine can make it slower, never faster."""
    path = write_video(tmp_path / "v.mp4", np.stack([frame_with_value(v, 48, 64) for v in range(8)]), fps=10)
    spans = {}
    for realtime in (False, True):
        mailbox, stop = mailbox_factory(f"rt{realtime}", slots=10, width=64, height=48), FlagEvent()
        decoder = Decoder(stream_id="v", url=str(path), live=False, fps=0, max_width=64, max_height=48,
                          mailbox=mailbox, stats=stats_factory(["v"]), sender=ListSender(), stop=stop,
                          realtime=realtime)
        code, got = run_decoder(decoder, mailbox, stop, until=100)
        assert code == EXIT_DONE and [g[0] for g in got] == list(range(8))
        spans[realtime] = got[-1][3] - got[0][3]
        if realtime:
            gaps = np.diff([g[3] for g in got])
            assert (gaps > 0.05).sum() >= 6  # every frame waited for its time, not a burst at the end
    assert spans[True] >= 0.65


def test_loop_and_realtime_on_a_camera_are_refused():
    data = {"streams": [{"id": "cam", "url": "rtsp://127.0.0.1:1/x", "prompt": "a person .", "loop": True}]}
    with pytest.raises(ConfigError, match="loop and realtime are for files"):
        parse_config(data)


def test_finished_file_ends_while_a_camera_always_has_a_frame(mailbox_factory, stats_factory):
    """On a loaded machine a camera always had a frame waiting, and a finished file next to it never got its
    `end_of_file` (the worker only finished streams on a round with nothing to process)."""
    from fakes import make_worker

    streams = [{"id": "file", "live": False, "prompt": "thing ."}, {"id": "cam", "live": True, "prompt": "thing ."}]
    worker, mailboxes, _, sender, _ = make_worker(mailbox_factory, stats_factory, streams)
    for value in range(3):
        mailboxes["file"].put(frame_with_value(value), frame_index=value, pts=value / 10, ts=value / 10, live=False)
    mailboxes["file"].finish(1)
    for round_ in range(6):
        mailboxes["cam"].put(frame_with_value(round_), frame_index=round_, pts=0, ts=time.time(), live=True)
        assert worker.step() > 0  # never an idle round
    ends = [e for e in sender.events if e["stream"] == "file" and e["kind"] == "status"]
    assert [(e["state"], e["reason"]) for e in ends] == [("offline", "end_of_file")]
