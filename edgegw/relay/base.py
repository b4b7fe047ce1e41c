"""The relay contract every backend honours (C splice, C select/poll, pure-Python asyncio).

A relay owns pairs of connected sockets and moves bytes between them until both directions
are done, then reports what happened. Callers never touch a socket after handing it over.
"""
from __future__ import annotations

import enum
import logging
import socket
from dataclasses import dataclass
from typing import Callable, Container, Protocol

log = logging.getLogger("edgegw.relay")

# C engine: microseconds a thread that just moved bulk waits before polling again (0: never,
# the default; csrc/relay.h says why). The same values as csrc/relay.h's RELAY_COALESCE_*_US
# (tests/test_relay_tuning.py holds them equal); here too so that they are known where the C
# engine is not built.
DEFAULT_COALESCE_US = 0
MAX_COALESCE_US = 100_000
# The longest idle timeout (about 31 years; 0 is never): csrc/relay.h's RELAY_IDLE_TIMEOUT_MAX.
MAX_IDLE_TIMEOUT = 1e9


class FinishReason(str, enum.Enum):
    """Why a relayed session ended; the value travels in PNC `closed` and the audit trail."""

    EOF = "eof"              # both directions reached end of stream and were forwarded
    RESET = "reset"          # one side reset or errored (ECONNRESET, EPIPE, ...)
    IDLE = "idle"            # no byte moved either way for the idle timeout
    KILLED = "killed"        # kill(session_id) was called
    SHUTDOWN = "shutdown"    # the relay itself was closed with sessions still running
    ERROR = "error"          # local failure (e.g. out of pipes/memory); see `error`


@dataclass(frozen=True, slots=True)
class RelayReport:
    """One finished session. `a` is the first socket given to add() (the SFTP client side)."""

    session_id: int
    bytes_a_to_b: int
    bytes_b_to_a: int
    duration: float          # seconds from add() to the end
    reason: FinishReason
    error: str = ""          # strerror of the failing call when reason is RESET/ERROR


@dataclass(frozen=True, slots=True)
class RelayStats:
    backend: str
    active_sessions: int
    total_sessions: int
    bytes_total: int
    pipes_in_use: int = 0    # splice backend only
    pipes_pooled: int = 0    # splice backend only
    buffers_in_use: int = 0  # select backend only: per-direction buffers holding bytes
    buffers_pooled: int = 0  # select backend only


FinishedCallback = Callable[[RelayReport], None]


def check_new_id(session_id: int, running: Container[int]) -> None:
    """The checks add() makes on an id before taking any socket (ValueError, FileExistsError)."""
    if not 0 <= session_id < 1 << 64:
        raise ValueError(f"relay session id must be an unsigned 64-bit int, got {session_id}")
    if session_id in running:
        raise FileExistsError(17, f"relay session {session_id} already exists; "
                                  "ids must be unique")


def deliver(on_finished: FinishedCallback | None, report: RelayReport) -> None:
    """Hand one report to the caller's callback; a failing callback is logged, so that it
    cannot lose the reports after it."""
    if on_finished is None:
        return
    try:
        on_finished(report)
    except Exception:
        log.exception("relay on_finished callback failed for session %d", report.session_id)


class Relay(Protocol):
    """What the gateway and the node need from a relay backend.

    Lifecycle: construct -> start(on_finished) inside a running asyncio loop -> add()/kill()
    -> close(). `on_finished` runs in the event loop thread, once per session.
    """

    backend: str  # "splice", "select" or "python"

    def start(self, on_finished: FinishedCallback) -> None: ...

    def add(self, session_id: int, a: socket.socket, b: socket.socket) -> None:
        """Take ownership of both sockets (they are detached from the caller) and relay them."""

    def kill(self, session_id: int) -> bool:
        """End a session now (reported with reason KILLED). False if it is not running."""

    def stats(self) -> RelayStats: ...

    async def close(self) -> None:
        """Stop relaying; running sessions are closed and reported with reason SHUTDOWN."""
