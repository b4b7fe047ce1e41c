"""The event loop both processes run on: uvloop when installed, else asyncio's own.

uvloop (libuv) runs each loop turn in C; a session's setup crosses the gateway's and the node's
loops several times, so this shortens it. EDGEGW_EVENT_LOOP=asyncio forces the standard loop
(for comparison, or if uvloop misbehaves on a platform).
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """"uvloop" or "asyncio": what `run` will use."""
    if os.environ.get("EDGEGW_EVENT_LOOP", "").lower() == "asyncio":
        return "asyncio"
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    if loop_name() == "uvloop":
        import uvloop
        return uvloop.run(main)
    return asyncio.run(main)
