"""Which driving frames an engine step animates when the engine is slower than the camera.

More frames arrive between two steps than a step takes (`n`, the engine window of 4). Keeping the newest `n` plays
`n` consecutive frames at full speed and then jumps; the official server takes every third of the last 12, which
still jumps as soon as more than 12 arrive. Here a step takes frames evenly spaced in time over the interval since
the previous step, ending with the newest (so latency does not grow): the animation advances at an even pace.

- `pick_evenly` chooses the step's frames from those buffered since the previous step.
- `thin` chooses which frame a full buffer gives up, so that a bounded buffer still spans the whole interval
  evenly when many more frames arrive than it holds (a very slow engine).

Times are seconds on one clock (`time.monotonic()` on the server), ascending.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence


def targets(times: Sequence[float], n: int, since: float | None) -> list[float]:
    """The `n` ideal times of a step's frames: the interval (since, newest] cut into `n` equal parts, each part's
    end (the last is the newest frame). Without a previous step (`since` None), `n` times from the oldest to the
    newest frame, both included."""
    newest = times[-1]
    if since is None:
        start = times[0]
        return [newest] if n == 1 else [start + (newest - start) * k / (n - 1) for k in range(n)]
    return [since + (newest - since) * (k + 1) / n for k in range(n)]


def pick_evenly(times: Sequence[float], n: int, since: float | None = None) -> list[int]:
    """Indices of the `n` frames (of those taken at `times`) nearest to `targets(times, n, since)`.

    Args:
        times: when each buffered frame was taken (ascending, at least `n`); since: when the previous step's newest
            frame was taken (None: no previous step).
    Returns:
        `n` ascending, distinct indices; the last is always the newest frame (`len(times) - 1`).
    """
    m = len(times)
    if not 1 <= n <= m:
        raise ValueError(f"cannot pick {n} of {m} frames")
    chosen: list[int] = []
    for k, target in enumerate(targets(times, n, since)):
        low = chosen[-1] + 1 if chosen else 0
        high = m - (n - k)  # leave a frame for each later target
        j = min(max(bisect_left(times, target), low), high)  # first frame at or after the target
        if j > low and target - times[j - 1] <= times[j] - target:
            j -= 1  # the frame before it is nearer (or as near: the older one)
        chosen.append(j)
    return chosen


def thin(times: Sequence[float], since: float | None = None) -> int:
    """The index of the frame a full buffer should drop: the one whose loss leaves the smallest gap in time, never
    the newest (nor, without a previous step, the oldest, which then starts the interval).

    Dropping where frames are densest keeps the buffer an even sample of the whole interval since `since`: with
    capacity c over an interval T, no gap grows much past 2T/c.
    """
    m = len(times)
    first = 0 if since is not None else 1
    if m - 1 <= first:
        return 0  # nothing between the ends: drop the oldest
    best, best_gap = first, float("inf")
    for i in range(first, m - 1):
        gap = times[i + 1] - (times[i - 1] if i > 0 else since)
        if gap < best_gap:  # strictly smaller: on ties the older frame goes
            best, best_gap = i, gap
    return best
