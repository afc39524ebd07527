"""Liveness for container healthchecks: with CONVEYOR_HEALTH_FILE set, a part touches that
file every CONVEYOR_HEARTBEAT_INTERVAL while its event loop runs and its broker connection
is up, and removes it when it stops. A healthcheck then only reads the file's age: the parts
listen on no port, and a check that started a Python client would cost a second of CPU.
"""

import asyncio
from pathlib import Path

from faststream import FastStream

from .settings import Settings


def watched(app: FastStream, settings: Settings) -> FastStream:
    """The app, touching CONVEYOR_HEALTH_FILE (when set) from its start to its shutdown."""
    if not settings.health_file:
        return app
    path = Path(settings.health_file)
    toucher: asyncio.Task | None = None

    @app.on_startup
    def forget_the_last_run() -> None:  # FastStream runs a plain function in a thread
        # A restarted container keeps its files: the last run's is no sign of this one.
        path.unlink(missing_ok=True)

    @app.after_startup
    async def start() -> None:
        nonlocal toucher
        await asyncio.to_thread(path.touch)  # a path that cannot be written stops the start
        toucher = asyncio.create_task(_touch_forever(app, path, settings.heartbeat_interval))

    @app.on_shutdown
    async def stop() -> None:
        if toucher is not None:  # one that failed to touch the file has left it stale
            toucher.cancel()
            await asyncio.gather(toucher, return_exceptions=True)

    @app.after_shutdown
    def stopped() -> None:
        path.unlink(missing_ok=True)

    return app


async def _touch_forever(app: FastStream, path: Path, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        if await app.broker.ping(timeout=interval):
            await asyncio.to_thread(path.touch)
