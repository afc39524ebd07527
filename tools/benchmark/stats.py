"""Percentiles of one repetition, and the count of tasks a run submitted and saw complete."""

import math
from dataclasses import dataclass


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Tally:
    """Tasks a run submitted (readiness probes aside) and those that came back completed;
    the difference is what the benchmark lost."""

    submitted: int = 0
    completed: int = 0

    @property
    def lost(self) -> int:
        return self.submitted - self.completed
