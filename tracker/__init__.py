"""Multi-object IoU tracker: per-frame detections in, tracks with stable ids and lifecycle events out.

    from tracker import Tracker, TrackerConfig
    tracker = Tracker(TrackerConfig())
    result = tracker.update(boxes_xyxy, scores, phrases, frame_index)   # -> TrackUpdate
    result.started, result.updated, result.lost, result.ended           # ids
    tracker.finish()                                                     # stream stopped: end everything
"""

from tracker.config import TrackerConfig

__all__ = ["Track", "Tracker", "TrackerConfig", "TrackerCounters", "TrackState", "TrackUpdate", "warm_up"]
_CORE = {"Track", "Tracker", "TrackerCounters", "TrackState", "TrackUpdate", "warm_up"}


def __getattr__(name: str):
    # The Numba core loads on first use, so reading the settings (the daemon's config parser) stays light.
    if name in _CORE:
        from tracker import core

        return getattr(core, name)
    raise AttributeError(f"module 'tracker' has no attribute {name!r}")
