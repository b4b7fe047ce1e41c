"""The relay spread over child processes: `edgegw serve --relay-procs N`.

Each session's two sockets go to one of N relay processes (edgegw.relay.worker, each running
the chosen engine) as SCM_RIGHTS over a socket pair, and the gateway closes its own copies, so
its descriptors stay few. Why:

* a process holds at most RLIMIT_NOFILE descriptors, two per session; where the hard limit
  cannot be raised (containers often fix it), N processes hold N times as many sessions;
* a relay process that dies takes only its own sessions: they are reported as ERROR (the nodes
  hear of it like any other end) and a new process takes its place.

The handoff costs one message and one wake-up of the relay process per session; without
`--relay-procs` the engine runs inside the gateway, which is the faster setup.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from edgegw.relay import wire
from edgegw.relay.base import (DEFAULT_COALESCE_US, FinishedCallback, FinishReason, RelayReport,
                               RelayStats, check_new_id, deliver)

log = logging.getLogger("edgegw.relay")


@dataclass(eq=False)
class _Proc:
    index: int
    ctrl: socket.socket
    popen: subprocess.Popen[bytes]
    sessions: set[int] = field(default_factory=set)
    stats: RelayStats | None = None   # the engine's counters, as last sent by the process


class ProcRelay:
    """`Relay` whose sessions run in `procs` child processes of `backend` engines."""

    def __init__(self, backend: str, *, procs: int, threads: int = 1, pipe_size: int = 1 << 20,
                 idle_timeout: float = 0.0, fin_timeout: float = 0.0,
                 coalesce_us: int = DEFAULT_COALESCE_US,
                 sched_batch: bool = True, log_level: str = "info") -> None:
        if procs < 1:
            raise ValueError(f"relay processes must be >= 1, got {procs}")
        self.backend = backend
        self._args = ["--backend", backend, "--threads", str(threads),
                      "--pipe-size", str(pipe_size), "--idle-timeout", repr(idle_timeout),
                      "--fin-timeout", repr(fin_timeout),
                      "--coalesce-us", str(coalesce_us), "--log-level", log_level,
                      *([] if sched_batch else ["--normal-sched"])]
        self._count = procs
        self._procs: list[_Proc] = []
        self._owner: dict[int, _Proc] = {}
        self._on_finished: FinishedCallback | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._total = 0
        self._retired_bytes = 0   # moved by relay processes that have exited

    # -- Relay -----------------------------------------------------------------------------
    def start(self, on_finished: FinishedCallback) -> None:
        if self._loop is not None:
            raise RuntimeError("relay already started")
        self._loop = asyncio.get_running_loop()
        self._on_finished = on_finished
        self._procs = [self._spawn(i) for i in range(self._count)]

    def add(self, session_id: int, a: socket.socket, b: socket.socket) -> None:
        if self._closed:
            raise RuntimeError("relay is closed")
        if not self._procs:
            raise RuntimeError("no relay process is running (see the errors above)")
        check_new_id(session_id, self._owner)
        proc = min(self._procs, key=lambda p: len(p.sessions))
        try:   # never blocks: a full control socket fails this one session, not the gateway
            socket.send_fds(proc.ctrl, [wire.command(wire.ADD, session_id)],
                            [a.fileno(), b.fileno()], socket.MSG_DONTWAIT)
        except OSError as exc:
            raise RuntimeError(f"relay process {proc.index} cannot take a session: "
                               f"{exc}") from None
        a.close()   # the relay process has its own descriptors now
        b.close()
        proc.sessions.add(session_id)
        self._owner[session_id] = proc
        self._total += 1

    def kill(self, session_id: int) -> bool:
        proc = self._owner.get(session_id)
        if proc is None or self._closed:
            return False
        try:
            proc.ctrl.send(wire.command(wire.KILL, session_id), socket.MSG_DONTWAIT)
        except OSError:
            return False
        return True

    def stats(self) -> RelayStats:
        """Sessions as the gateway handed them out; bytes and pipes as the relay processes
        last reported them (after each batch of finished sessions, and every second while
        they move bytes)."""
        live = [p.stats for p in self._procs if p.stats is not None]
        return RelayStats(backend=self.backend, active_sessions=len(self._owner),
                          total_sessions=self._total,
                          bytes_total=self._retired_bytes + sum(st.bytes_total for st in live),
                          pipes_in_use=sum(st.pipes_in_use for st in live),
                          pipes_pooled=sum(st.pipes_pooled for st in live),
                          buffers_in_use=sum(st.buffers_in_use for st in live),
                          buffers_pooled=sum(st.buffers_pooled for st in live))

    async def close(self) -> None:
        """Stop every relay process: each closes its sessions and reports them (SHUTDOWN)."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            try:
                proc.ctrl.send(wire.command(wire.STOP), socket.MSG_DONTWAIT)
            except OSError:
                pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while any(p.popen.poll() is None for p in self._procs) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for proc in list(self._procs):
            self._on_readable(proc)          # the last reports
            self._retire(proc, "the relay was closed")

    # -- relay processes ---------------------------------------------------------------------
    def _spawn(self, index: int) -> _Proc:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "edgegw.relay.worker", "--fd", str(theirs.fileno()),
                 *self._args], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        proc = _Proc(index, ours, popen)
        assert self._loop is not None
        self._loop.add_reader(ours.fileno(), self._on_readable, proc)
        log.info("relay process %d started (pid %d)", index, popen.pid)
        return proc

    def _on_readable(self, proc: _Proc) -> None:
        while True:
            try:
                msg = proc.ctrl.recv(wire.MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:
                self._lost(proc)
                return
            try:
                report = wire.parse_report(msg)
            except ValueError as exc:
                log.error("relay process %d sent garbage (%s); ignored", proc.index, exc)
                continue
            if isinstance(report, RelayStats):
                proc.stats = report
            else:
                self._finish(report)

    def _finish(self, report: RelayReport) -> None:
        proc = self._owner.pop(report.session_id, None)
        if proc is None:
            return                       # reported already (its process was lost meanwhile)
        proc.sessions.discard(report.session_id)
        deliver(self._on_finished, report)

    def _lost(self, proc: _Proc) -> None:
        """The control socket closed: the process exited (or is about to)."""
        if proc not in self._procs:
            return
        code = proc.popen.poll()
        if not self._closed:
            log.error("relay process %d (pid %d) exited (%s) with %d sessions; they are lost, "
                      "starting a new one", proc.index, proc.popen.pid,
                      "still running" if code is None else f"status {code}", len(proc.sessions))
        self._retire(proc, "relay process exited")
        if not self._closed:
            try:
                self._procs.append(self._spawn(proc.index))
            except OSError as exc:   # out of descriptors or processes: run with fewer
                log.error("cannot start a new relay process %d: %s; %d left", proc.index, exc,
                          len(self._procs))

    def _retire(self, proc: _Proc, why: str) -> None:
        if proc not in self._procs:
            return
        self._procs.remove(proc)
        if proc.stats is not None:
            self._retired_bytes += proc.stats.bytes_total
        assert self._loop is not None
        self._loop.remove_reader(proc.ctrl.fileno())
        proc.ctrl.close()
        for sid in list(proc.sessions):  # whatever was not reported is gone with the process
            self._finish(RelayReport(sid, 0, 0, 0.0, FinishReason.ERROR, why))
        if proc.popen.poll() is None:
            proc.popen.kill()
        proc.popen.wait()
