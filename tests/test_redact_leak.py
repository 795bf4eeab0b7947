"""Leak rate of redaction on shapes-world videos with ground truth, real default-model detections.

Objects move, cross (one hides the other), enter and leave; on top of the detector's own misses every detection
of a random 10 % of frames is dropped. A (frame, object) pair leaks when the object's ground-truth box is not
wholly inside the union of redacted (padded) boxes. Per-frame detections alone leak on every miss; the offline
planner that `groundwatch redact` uses follows tracks through them. Full figures: benchmarks/redaction_leak.py
and docs/benchmarks.md.
"""

from pathlib import Path

import pytest
import torch

import gdino
from gdino import shapes
from streamer.editing.leak import shapes_leak
from streamer.editing.planner import PlannerConfig

ASSET = Path(gdino.__file__).parent / "assets" / "default"

# Not the 0.2 %: the honest figure with a margin. With the default model the tracked planner leaks 0 of
# these two videos' 252 pairs (2.4 % before helper leak4's planner changes: three objects leaving at the edges) and
# 0.64 % / 0.52 % on the benchmark's two sets of six (docs/benchmarks.md), per-frame 26 %. What is left there is
# detection boxes too small for the padding and objects the detector saw at most twice; a retrained detector moves
# these figures, so the limit leaves room for it rather than being tuned to this one.
TRACKED_LEAK_LIMIT = 0.02
# Redaction must not buy its recall by hiding the frame: on these videos the tracked plan covers about 27 % of
# the frame (ground-truth boxes: 5 %, per-frame detections padded: 8 %).
TRACKED_AREA_LIMIT = 0.4


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 80 detections: minutes on a quiet 2-core machine; timed out at 600 s on a loaded one
@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="default weights not shipped")
def test_tracked_redaction_leaks_far_less_than_per_frame_detections():
    torch.set_num_threads(2)
    model = gdino.load("default")
    seeds = [shapes.EVAL_SEED_OFFSET + 600_000 + v for v in range(2)]
    report = shapes_leak(model, seeds, num_frames=40, drop_fraction=0.1, padding=0.2, config=PlannerConfig())
    per_frame, tracked, live = report.rate("per_frame"), report.rate("tracked"), report.rate("live")
    print(f"\nleak rate over {report.pairs} (frame, object) pairs, {report.dropped_frames}/{report.frames} frames "
          f"dropped: per-frame {100 * per_frame:.2f} %, tracked {100 * tracked:.2f} %, live {100 * live:.2f} %; "
          f"area redacted: per-frame {100 * report.area('per_frame'):.1f} %, tracked {100 * report.area('tracked'):.1f} %")
    assert report.pairs > 150 and report.dropped_frames > 0
    assert per_frame > 0.05, "the detector misses too little for this test to show anything"
    assert tracked <= TRACKED_LEAK_LIMIT, f"tracked redaction leaked {100 * tracked:.2f} %"
    assert tracked <= per_frame / 4, (tracked, per_frame)
    assert live < per_frame, (live, per_frame)
    assert report.area("tracked") <= TRACKED_AREA_LIMIT, f"tracked redaction hid {100 * report.area('tracked'):.1f} %"
