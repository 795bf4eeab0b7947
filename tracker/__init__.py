"""Multi-object IoU tracker: per-frame detections in, tracks with stable ids and lifecycle events out.

    from tracker import Tracker, TrackerConfig
    tracker = Tracker(TrackerConfig())
    result = tracker.update(boxes_xyxy, scores, phrases, frame_index)   # -> TrackUpdate
    result.started, result.updated, result.lost, result.ended           # ids
    tracker.finish()                                                     # stream stopped: end everything
"""

from tracker.config import TrackerConfig
from tracker.core import Track, Tracker, TrackerCounters, TrackState, TrackUpdate, warm_up

__all__ = ["Track", "Tracker", "TrackerConfig", "TrackerCounters", "TrackState", "TrackUpdate", "warm_up"]
