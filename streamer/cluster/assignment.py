"""Which detector actor serves which stream: spread by load, moved as little as possible.

A stream's load is what it asks of a detector: frames per second times pixels per frame (the detector resizes every
frame to the same short side, but decoding, the copy through the object store and pre-processing grow with the
pixels; a stream of unknown rate counts as `DEFAULT_FPS`). Pure functions, tested on their own.
"""

from __future__ import annotations

DEFAULT_FPS = 25.0


def stream_load(fps: float, width: int, height: int) -> float:
    """Pixels per second a stream sends its detector (`fps` 0 = unknown: `DEFAULT_FPS`)."""
    return (fps if fps > 0 else DEFAULT_FPS) * max(1, width) * max(1, height)


def assign(loads: dict[str, float], actors: list[str], current: dict[str, str] | None = None) -> dict[str, str]:
    """Streams -> actors, the heaviest stream first to the least loaded actor (longest-processing-time first:
    within 4/3 of the best spread). Streams of `current` whose actor is still in `actors` stay where they are;
    only the others are placed. Ties go to the actor named first, so the answer is deterministic."""
    if not actors:
        return {}
    current = current or {}
    placed = {stream: actor for stream, actor in current.items() if actor in actors and stream in loads}
    totals = {actor: 0.0 for actor in actors}
    for stream, actor in placed.items():
        totals[actor] += loads[stream]
    for stream in sorted((s for s in loads if s not in placed), key=lambda s: (-loads[s], s)):
        actor = min(actors, key=lambda a: (totals[a], actors.index(a)))
        placed[stream] = actor
        totals[actor] += loads[stream]
    return placed


def rebalance(loads: dict[str, float], actors: list[str], current: dict[str, str],
              tolerance: float = 0.25) -> dict[str, str]:
    """After an actor comes back (or joins): move streams from the busiest actors to the idlest, one at a time,
    while a move makes the busiest actor lighter by more than `tolerance` of the mean load. Moves are few:
    each costs the moved stream a hand-over. Returns the new assignment (the moves are where it differs)."""
    placed = assign(loads, actors, current)
    if len(actors) < 2 or not loads:
        return placed
    mean = sum(loads.values()) / len(actors)
    for _ in range(len(loads)):
        totals = {actor: 0.0 for actor in actors}
        for stream, actor in placed.items():
            totals[actor] += loads[stream]
        busiest = max(actors, key=lambda a: (totals[a], -actors.index(a)))
        idlest = min(actors, key=lambda a: (totals[a], actors.index(a)))
        candidates = sorted((s for s, a in placed.items() if a == busiest), key=lambda s: (loads[s], s))
        best = None
        for stream in candidates:
            # The move helps when the busiest actor's load falls and the idlest one's stays below it.
            after = max(totals[busiest] - loads[stream], totals[idlest] + loads[stream])
            if totals[busiest] - after > tolerance * mean and (best is None or after < best[1]):
                best = (stream, after)
        if best is None:
            break
        placed[best[0]] = idlest
    return placed


def actor_loads(loads: dict[str, float], placed: dict[str, str], actors: list[str]) -> dict[str, float]:
    totals = {actor: 0.0 for actor in actors}
    for stream, actor in placed.items():
        if actor in totals:
            totals[actor] += loads.get(stream, 0.0)
    return totals
