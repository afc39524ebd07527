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
    the difference is what the benchmark lost. And the messages its deployments
    dead-lettered but for the readiness probes' (sent before the service registered: see
    Deployment.ready): a handler that failed on one five times, a malformed message, which
    no run should see."""

    submitted: int = 0
    completed: int = 0
    dead_letters: int = 0

    @property
    def lost(self) -> int:
        return self.submitted - self.completed


async def count_dead_letters(client, tally: Tally) -> None:
    """Add the deployment's dead letters (of its last 1,000) to the tally."""
    letters = await client.dead_letters(limit=1000)
    tally.dead_letters += sum(letter["error_type"] != "UnknownService" for letter in letters)
