"""A relay process: runs one relay engine for the gateway that started it (edgegw.relay.procs).

It takes sessions (two descriptors each) from its control socket, reports each finished one
back, sends its engine's counters after reports and every STATS_INTERVAL while they change
(so the gateway's figures include running sessions), and exits when told to stop or when the
gateway goes away (the control socket closes): its sessions are then closed and reported like
any relay shutdown. Signals are the gateway's business: SIGINT (a Ctrl-C reaching the whole
process group) is ignored here.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal
import socket
import sys

from edgegw.eventloop import run
from edgegw.limits import raise_fd_limit
from edgegw.logsetup import LEVELS, setup_logging
from edgegw.relay import wire
from edgegw.relay.base import DEFAULT_COALESCE_US, FinishReason, Relay, RelayReport, RelayStats

log = logging.getLogger("edgegw.relay.worker")

STATS_INTERVAL = 1.0   # seconds between counter updates while sessions move bytes


class Worker:
    """Serves the control socket: sessions in, reports out, never blocking on the gateway."""

    def __init__(self, ctrl: socket.socket, relay: Relay) -> None:
        self.ctrl = ctrl
        self.relay = relay
        self.stopped = asyncio.Event()
        self._out: collections.deque[bytes] = collections.deque()
        self._writing = False
        self._sent_stats: RelayStats | None = None
        self._stats_due = False
        self._ticker: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.relay.start(self._report)
        loop.add_reader(self.ctrl.fileno(), self._on_command)
        self._ticker = loop.call_later(STATS_INTERVAL, self._tick)

    def _tick(self) -> None:
        self.send_stats()
        self._ticker = asyncio.get_running_loop().call_later(STATS_INTERVAL, self._tick)

    def send_stats(self) -> None:
        """Queue the engine's counters if they moved since the last ones sent."""
        self._stats_due = False
        st = self.relay.stats()
        if st != self._sent_stats:
            self._sent_stats = st
            self._out.append(wire.stats(st))
            self._flush()

    def _on_command(self) -> None:
        while not self.stopped.is_set():
            try:
                msg, fds, _, _ = socket.recv_fds(self.ctrl, 64, 2, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("control socket failed (%s); stopping", exc)
                msg, fds = b"", []
            if not msg:
                self.stop()                      # the gateway is gone
                return
            try:
                op, sid = wire.parse_command(msg)
            except ValueError as exc:
                log.error("bad message from the gateway (%s); ignored", exc)
                op, sid = 0, 0
            if op == wire.ADD and len(fds) == 2:
                self._add(sid, fds)
                fds = []
            elif op == wire.KILL:
                self.relay.kill(sid)
            elif op == wire.STOP:
                self.stop()
            for fd in fds:                        # descriptors that came with a wrong message
                socket.close(fd)

    def _add(self, sid: int, fds: list[int]) -> None:
        socks: list[socket.socket] = []
        try:
            for fd in fds:
                socks.append(socket.socket(fileno=fd))   # OSError: not a socket
            self.relay.add(sid, *socks)
        except Exception as exc:   # e.g. the engine is out of memory: report, never crash
            log.error("session %016x: relay refused it: %s", sid, exc)
            for fd in fds[len(socks):]:   # not wrapped: closed here, or they would leak
                socket.close(fd)
            for sock in socks:
                sock.close()
            self._report(RelayReport(sid, 0, 0, 0.0, FinishReason.ERROR, str(exc)))

    def stop(self) -> None:
        if not self.stopped.is_set():
            asyncio.get_running_loop().remove_reader(self.ctrl.fileno())
            if self._ticker is not None:
                self._ticker.cancel()
            self.stopped.set()

    def _report(self, report: RelayReport) -> None:
        self._out.append(wire.done(report))
        self._flush()
        if not self._stats_due:   # one update after a batch of reports, not one per report
            self._stats_due = True
            asyncio.get_running_loop().call_soon(self.send_stats)

    def _flush(self) -> None:
        """Send queued reports without ever blocking: a gateway that is itself busy sending
        to us must not deadlock with us sending to it."""
        loop = asyncio.get_running_loop()
        while self._out:
            try:
                self.ctrl.send(self._out[0], socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not self._writing:
                    loop.add_writer(self.ctrl.fileno(), self._flush)
                    self._writing = True
                return
            except OSError:                       # the gateway is gone: nobody to tell
                self._out.clear()
                break
            self._out.popleft()
        if self._writing:
            loop.remove_writer(self.ctrl.fileno())
            self._writing = False

    async def drain(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._out and loop.time() < deadline:
            await asyncio.sleep(0.01)


async def _main(args: argparse.Namespace) -> None:
    from edgegw.relay import create_relay
    ctrl = socket.socket(fileno=args.fd)
    relay = create_relay(args.backend, threads=args.threads, pipe_size=args.pipe_size,
                         idle_timeout=args.idle_timeout, fin_timeout=args.fin_timeout,
                         coalesce_us=args.coalesce_us,
                         sched_batch=not args.normal_sched)
    worker = Worker(ctrl, relay)
    worker.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop)
    log.debug("relay process ready (%s backend)", relay.backend)
    await worker.stopped.wait()
    await relay.close()                           # running sessions: reported as SHUTDOWN
    worker.send_stats()                           # the final counters
    await worker.drain()
    ctrl.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgegw.relay.worker",
                                 description="A gateway relay process (started by edgegw serve).")
    ap.add_argument("--fd", type=int, required=True, help="control socket (SOCK_SEQPACKET)")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pipe-size", type=int, default=1 << 20)
    ap.add_argument("--idle-timeout", type=float, default=0.0)
    ap.add_argument("--fin-timeout", type=float, default=0.0)
    ap.add_argument("--coalesce-us", type=int, default=DEFAULT_COALESCE_US)
    ap.add_argument("--normal-sched", action="store_true", help="no SCHED_BATCH")
    ap.add_argument("--log-level", choices=LEVELS, default="info")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(args.log_level)
    raise_fd_limit()
    run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
