"""Messages between the gateway and its relay processes (edgegw.relay.procs and .worker).

They travel over an AF_UNIX SOCK_SEQPACKET socket pair, so each send is one message and needs
no framing; an ADD carries the session's two descriptors as SCM_RIGHTS.

    gateway -> relay process:  ADD (sid, fds=[client, data]) | KILL (sid) | STOP
    relay process -> gateway:  DONE (one finished session, as a RelayReport)
                               | STATS (the engine's counters, RelayStats, now and then)
"""
from __future__ import annotations

import struct

from edgegw.relay.base import FinishReason, RelayReport, RelayStats

ADD, KILL, STOP, DONE, STATS = 1, 2, 3, 4, 5

_CMD = struct.Struct("!BQ")               # op, session id
_DONE = struct.Struct("!BQQQd")           # op, session id, a->b, b->a, duration; reason, error
_STATS = struct.Struct("!B7Q")          # op, RelayStats' counters in field order
MAX_MESSAGE = 1024                        # a DONE with its error text stays well under this
_REASONS = list(FinishReason)


def command(op: int, session_id: int = 0) -> bytes:
    return _CMD.pack(op, session_id)


def parse_command(msg: bytes) -> tuple[int, int]:
    """(op, session id); ValueError for anything that is not a command."""
    if len(msg) != _CMD.size:
        raise ValueError(f"relay command of {len(msg)} bytes")
    op, sid = _CMD.unpack(msg)
    if op not in (ADD, KILL, STOP):
        raise ValueError(f"unknown relay command {op}")
    return op, sid


def done(report: RelayReport) -> bytes:
    error = report.error.encode("utf-8", "replace")[:MAX_MESSAGE - _DONE.size - 1]
    return (_DONE.pack(DONE, report.session_id, report.bytes_a_to_b, report.bytes_b_to_a,
                       report.duration)
            + bytes((_REASONS.index(report.reason),)) + error)


def parse_done(msg: bytes) -> RelayReport:
    """The report in a DONE message; ValueError if it is not one."""
    if len(msg) < _DONE.size + 1:
        raise ValueError(f"relay report of {len(msg)} bytes")
    op, sid, a_to_b, b_to_a, duration = _DONE.unpack_from(msg)
    reason = msg[_DONE.size]
    if op != DONE or reason >= len(_REASONS):
        raise ValueError(f"not a relay report (op {op}, reason {reason})")
    return RelayReport(sid, a_to_b, b_to_a, duration, _REASONS[reason],
                       msg[_DONE.size + 1:].decode("utf-8", "replace"))


def stats(st: RelayStats) -> bytes:
    return _STATS.pack(STATS, st.active_sessions, st.total_sessions, st.bytes_total,
                       st.pipes_in_use, st.pipes_pooled, st.buffers_in_use, st.buffers_pooled)


def parse_report(msg: bytes) -> RelayReport | RelayStats:
    """What a relay process sent: a finished session or its counters; ValueError otherwise.
    The stats' `backend` is left empty: the gateway knows which engine it started."""
    if msg[:1] == bytes((STATS,)):
        if len(msg) != _STATS.size:
            raise ValueError(f"relay stats of {len(msg)} bytes")
        return RelayStats("", *_STATS.unpack(msg)[1:])
    return parse_done(msg)
