"""Run an async service until SIGINT/SIGTERM; the second signal stops at once."""
from __future__ import annotations

import asyncio
import signal
from typing import Awaitable, Callable

from edgegw.eventloop import run


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    async def _runner() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()

        def _on_signal() -> None:
            if stop.is_set() and task is not None:
                task.cancel()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _on_signal)
        try:
            await main(stop)
        except asyncio.CancelledError:
            pass

    run(_runner())
