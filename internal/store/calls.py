"""Store calls from async code, on threads of their own.

Not on asyncio's default executor, which the SFTP server's file work shares (resume copies,
fsyncs at commit, quota scans): a slow or locked database (PostgreSQL waits up to its lock
timeout) then delays logins, leases and refreshes only, and a burst of upload commits cannot
hold up logins. A bulkhead, in short.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# As many as the SQL stores pool connections (internal.store.sql): more threads would wait
# for a connection anyway.
STORE_THREADS = 8

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="edgegw-store")
        return _executor


async def store_call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`await asyncio.to_thread(fn, ...)`, on the store's threads."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool(), call)
