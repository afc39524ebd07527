"""Whether the wall clock has run on steadily: leases are moments of the wall clock, and
they cannot be judged across a step of it.

A machine suspended and woken (a laptop's lid closed) finds its wall clock moved on by the
time it slept, while its monotonic clock did not count it: every lease renewed before then
looks silent for that long, though no worker could renew it meanwhile. So does a VM that
was paused, once its clock is set right, and a clock set by hand. The workers renew within
a heartbeat interval of waking (their timers run on the monotonic clock), but the sweep may
come first and take every running task from its live worker. A sweep asks first how long
the clock has been steady, and so does a worker before it takes over an attempt whose
holder looks silent.
"""

import time
from collections.abc import Callable

STEP = 1.0  # seconds the wall clock may move apart from the monotonic one between two looks


class WallClock:
    """Watches the wall clock against the monotonic one (each look compares the two since
    the last)."""

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall, self._monotonic = wall, monotonic
        self._apart = wall() - monotonic()
        self._steady_since = float("-inf")  # no step seen yet

    def steady_for(self) -> float:
        """Seconds since the wall clock last stepped (0 on the look that sees the step);
        infinite until it has."""
        now = self._monotonic()
        apart = self._wall() - now
        if abs(apart - self._apart) > STEP:
            self._steady_since = now
        self._apart = apart
        return now - self._steady_since
