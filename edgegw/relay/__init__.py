"""The relay: moves an SFTP client's bytes to its internal node and back, untouched.

`create_relay()` is the one place that picks a backend:

* "splice": the C engine with epoll + splice() (Linux, the default there);
* "select": the C engine with poll() and a buffer per direction (the default elsewhere);
* "python": pure asyncio, used when the C extension is missing, and as a baseline.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from edgegw.relay.base import (DEFAULT_COALESCE_US, MAX_COALESCE_US, MAX_IDLE_TIMEOUT,
                               FinishedCallback, FinishReason, Relay, RelayReport, RelayStats)

__all__ = [
    "DEFAULT_COALESCE_US", "MAX_COALESCE_US", "MAX_IDLE_TIMEOUT",
    "FinishReason", "FinishedCallback", "Relay", "RelayReport", "RelayStats",
    "available_backends", "create_relay", "default_backend", "splice_works",
]

log = logging.getLogger("edgegw.relay")

BACKENDS = ("splice", "select", "python")
ENV_BACKEND = "EDGEGW_RELAY_BACKEND"


def _c_backends() -> tuple[str, ...] | None:
    try:
        engine = importlib.import_module("edgegw._relay")
    except ImportError:
        return None
    return tuple(engine.BACKENDS)


def available_backends() -> list[str]:
    """Backends that can run here, best first."""
    return [*(_c_backends() or ()), "python"]


def default_backend() -> str:
    chosen = os.environ.get(ENV_BACKEND, "").strip()
    if chosen:
        return chosen
    if not sys.platform.startswith("linux"):
        return "select"
    if not splice_works():
        log.warning("splice() is not usable here (a sandbox or seccomp filter?); relaying with "
                    "the poll() backend instead")
        return "select"
    return "splice"


def splice_works() -> bool:
    """Whether splice() moves bytes from a socket into a pipe here: sandboxes (gVisor, strict
    seccomp profiles) may refuse it with ENOSYS, EINVAL or EPERM."""
    if not hasattr(os, "splice"):
        return False
    import socket
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        a.send(b"x")
        return os.splice(b.fileno(), w, 1) == 1
    except OSError:
        return False
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def create_relay(backend: str | None = None, *, threads: int = 1, pipe_size: int = 1 << 20,
                 idle_timeout: float = 0.0, fin_timeout: float = 0.0, procs: int = 0,
                 coalesce_us: int = DEFAULT_COALESCE_US, sched_batch: bool = True) -> Relay:
    """A relay of the given backend; None means $EDGEGW_RELAY_BACKEND, else the platform's best.

    `threads` (C engine) spreads sessions over that many I/O threads; `pipe_size` is asked of
    the kernel for each splice pipe (smaller if refused); `idle_timeout` (seconds, 0 = never)
    ends sessions that moved no byte either way for that long, and `fin_timeout` (0 = only
    idle_timeout) those one side has closed: a peer that never closes its own side after the
    other did would hold the session forever. `procs` > 0 runs the engine in
    that many child processes instead of this one (edgegw.relay.procs). `coalesce_us` (C
    engine) is how long a thread that just moved a little bulk waits before it polls again, so
    bulk is moved in fewer wakeups (csrc/relay.h, RELAY_COALESCE_MIN); 0 turns it off.
    `sched_batch` (C engine, Linux) runs its threads SCHED_BATCH, so their wakeups do not
    preempt busy CPUs.
    """
    name = backend or default_backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown relay backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if threads < 1:
        raise ValueError(f"relay threads must be >= 1, got {threads}")
    for what, value in (("idle_timeout", idle_timeout), ("fin_timeout", fin_timeout)):
        if not 0 <= value <= MAX_IDLE_TIMEOUT:   # also refuses nan
            raise ValueError(f"relay {what} must be 0..{MAX_IDLE_TIMEOUT:g} seconds, "
                             f"got {value}")
    if not 0 <= coalesce_us <= MAX_COALESCE_US:
        raise ValueError(f"relay coalesce_us must be 0..{MAX_COALESCE_US}, got {coalesce_us}")
    if name != "python":
        c_backends = _c_backends()
        if c_backends is None:
            log.warning(
                "RELAY C ENGINE MISSING: edgegw._relay could not be imported, so the %r relay "
                "is replaced by the pure-Python one. Throughput will be far lower and CPU use "
                "far higher. Fix: reinstall edgegw with a C compiler and Cython available "
                "(e.g. `pip install --force-reinstall --no-binary edgegw edgegw`, or "
                "`python setup.py build_ext --inplace` in a checkout).", name)
            name = "python"
        elif name not in c_backends:
            raise ValueError(f"relay backend {name!r} is not available on this system; "
                             f"available: {', '.join(available_backends())}")
    if procs < 0:
        raise ValueError(f"relay processes must be >= 0, got {procs}")
    if procs:
        from edgegw.relay.procs import ProcRelay
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        return ProcRelay(name, procs=procs, threads=threads, pipe_size=pipe_size,
                         idle_timeout=idle_timeout, fin_timeout=fin_timeout,
                         coalesce_us=coalesce_us, sched_batch=sched_batch,
                         log_level=level if level in ("debug", "info", "warning", "error")
                         else "info")
    if name == "python":
        from edgegw.relay.pyrelay import PyRelay
        return PyRelay(idle_timeout=idle_timeout, fin_timeout=fin_timeout)
    from edgegw.relay.cengine import CRelay
    return CRelay(name, threads=threads, pipe_size=pipe_size, idle_timeout=idle_timeout,
                  fin_timeout=fin_timeout, coalesce_us=coalesce_us, sched_batch=sched_batch)
