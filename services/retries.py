"""Retry policy: which failures are tried again, and after how long.

A failed attempt is retried while attempts remain (`max_retries` after the first, set per
service and overridable per task) and its exception type is not one the service named as
not retryable. The wait doubles with each attempt up to a ceiling, and is jittered (between
half and all of it) so that retries of many tasks do not arrive together.
"""

import random
from dataclasses import dataclass

# Failures that another attempt cannot cure: the same input fails the same way.
NEVER_RETRIED = frozenset({"ResultNotSerializable", "CheckpointRefused", "TaskCancelled"})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 0
    backoff: float = 1.0  # seconds before the first retry
    backoff_max: float = 60.0
    not_retried: frozenset[str] = frozenset()

    def retries(self, attempt: int, error_type: str) -> bool:
        """Whether a failure of `attempt` (counted from 1) is tried again."""
        if error_type in NEVER_RETRIED or error_type in self.not_retried:
            return False
        return attempt <= self.max_retries

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after `attempt`."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        return ceiling * (0.5 + random.random() / 2)

    def why_not(self, attempt: int, error_type: str) -> str:
        """The reason, for the final error, that a failure was not tried again."""
        if error_type in NEVER_RETRIED or error_type in self.not_retried:
            return f"{error_type} is not retried"
        if self.max_retries == 0:
            return "retries are off"
        return f"gave up after {attempt} attempts"
