"""Running a process's main coroutine to its end without hanging on the way out."""

import asyncio
from typing import Any

LEFT_TASKS_SECONDS = 5.0  # how long the tasks still running at the end get to finish


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
