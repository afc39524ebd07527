"""Running a part's process: its main coroutine to its end without hanging on the way out,
and its garbage collector set for a long-running server once it has started."""

import asyncio
import gc
from typing import Any

LEFT_TASKS_SECONDS = 5.0  # how long the tasks still running at the end get to finish
# Objects allocated (net of those freed) between two collections of the youngest generation.
GC_THRESHOLD = 10_000


def run(coroutine, *, uvloop: bool = True) -> Any:
    """Run `coroutine` on a new event loop (uvloop's when installed) and close the loop.

    As asyncio.run, but the tasks left running at the end, cancelled, get LEFT_TASKS_SECONDS
    to finish, not for ever: an aio-pika connection stopped while it connects catches its
    cancellation and connects again (mosquito/aio-pika#414), so a part stopped while the
    broker is unreachable, or `conveyor up` stopped while it waits for the parts, would
    never exit.
    """
    loop = _new_loop(uvloop)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coroutine)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=LEFT_TASKS_SECONDS))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.set_exception_handler(lambda _loop, _context: None)  # what is left: dropped
            asyncio.set_event_loop(None)
            loop.close()


def _new_loop(uvloop: bool) -> asyncio.AbstractEventLoop:
    if uvloop:
        try:
            import uvloop as fast
        except ImportError:
            pass
        else:
            return fast.new_event_loop()
    return asyncio.new_event_loop()


def settle_heap() -> None:
    """Once a part has started, leave what it has built so far (its modules, its app, its
    connections) out of every garbage collection from now on, and collect the youngest
    objects every GC_THRESHOLD allocations rather than Python's 700.

    Nearly everything a part allocates per message is freed by reference counting, so the
    collector's passes over it find almost nothing: with Python's defaults, under load,
    the control plane and the orchestrator spent 13 to 18 % of their CPU in them and a
    workflow service 10 %, and each full pass, over the 100,000-odd objects of the
    libraries loaded, stopped a part for 65 to 125 ms. A cycle left behind is still
    collected, some thousands of allocations later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
