"""The watch on the wall clock that the orchestrator's sweep and a worker's claim keep
(services/wall_clock.py), on simulated clocks: a machine's sleep or a clock set by hand
cannot be caused here."""

from conveyor.services.wall_clock import WallClock


class Clocks:
    """A wall clock and a monotonic one, moved by the test."""

    def __init__(self) -> None:
        self.wall, self.monotonic = 1_800_000_000.0, 500.0

    def run(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds


def test_a_steady_wall_clock_lets_leases_be_judged_from_the_start_simulated_clocks():
    clocks = Clocks()
    watch = WallClock(lambda: clocks.wall, lambda: clocks.monotonic)
    assert watch.steady_for() == float("inf")
    clocks.run(2)
    clocks.wall += 0.001  # the clock slewed by NTP: not a step
    assert watch.steady_for() == float("inf")


def test_a_machine_that_slept_waits_a_steady_while_before_judging_leases_simulated_clocks():
    clocks = Clocks()
    watch = WallClock(lambda: clocks.wall, lambda: clocks.monotonic)
    clocks.run(2)
    clocks.wall += 600  # suspended for ten minutes: the monotonic clock did not count them
    assert watch.steady_for() == 0
    clocks.run(2)
    assert watch.steady_for() == 2
    clocks.run(9)
    assert watch.steady_for() == 11


def test_a_clock_set_back_counts_as_a_step_too_simulated_clocks():
    clocks = Clocks()
    watch = WallClock(lambda: clocks.wall, lambda: clocks.monotonic)
    clocks.run(2)
    clocks.wall -= 30
    assert watch.steady_for() == 0
