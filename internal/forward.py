"""Forward mode: relay each session to an existing TCP service (OpenSSH, another SFTP server)
with the same C engine, instead of running the node's own SSH server.

The node knows no users here, only client addresses: a ban (the operator's `ban add`, or a
defender on a shared store) refuses new sessions from the address and, within the recheck
interval, ends the ones it already has."""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from edgegw import proxyproto
from edgegw.netaddr import HostPort
from edgegw.relay import Relay, RelayReport, create_relay
from edgegw.sockio import connect_tcp
from internal.audit import AuditLog
from internal.session import SessionContext, SessionResult
from internal.ssh.revocation import BANNED, DEFAULT_INTERVAL as RECHECK_INTERVAL

log = logging.getLogger("edgegw.node.session")

CONNECT_TIMEOUT = 5.0


class ForwardService:
    def __init__(self, target: HostPort, *, proxy_protocol: str | None = None,
                 capacity: int = 0, banned: Callable[[str], object] | None = None,
                 audit: AuditLog | None = None, relay: Relay | None = None,
                 recheck_interval: float = RECHECK_INTERVAL) -> None:
        self.target = target
        self.proxy_protocol = proxy_protocol
        self.capacity = capacity
        self._banned = banned
        self._audit = audit
        self._relay = relay or create_relay()
        self._relay_started = False
        self._waiting: dict[int, asyncio.Future[RelayReport]] = {}
        self._relayed: dict[int, SessionContext] = {}   # sessions the relay holds
        self._revoked: set[int] = set()                 # ... ended by end_banned()
        self._serving: dict[int, asyncio.Task[object]] = {}   # ... and the tasks serving them
        self._closing = False
        self._next_id = 1
        self._recheck_interval = recheck_interval
        self._checker: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        """Nothing to load (bans come from the node's memory); watch running sessions."""
        if self._banned is not None and self._checker is None:
            self._checker = asyncio.get_running_loop().create_task(self._check_loop())

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self._recheck_interval)
            self.end_banned()

    def end_banned(self) -> int:
        """End the running sessions whose client address is banned now; how many."""
        ended = 0
        for rid, ctx in list(self._relayed.items()):
            if rid in self._revoked or self._banned is None or not self._banned(ctx.client_ip):
                continue
            self._revoked.add(rid)
            log.warning("session %s: client %s:%d: ending it: %s", ctx.session_id,
                        ctx.client_ip, ctx.client_port, BANNED)
            self._record("session.revoked", ctx, {"reason": BANNED, "result": "revoked"})
            if self._relay.kill(rid):
                ended += 1
        return ended

    def admit(self, client_ip: str) -> str | None:
        if self._banned is not None and self._banned(client_ip):
            return "banned"
        if self.capacity and self.active >= self.capacity:
            return "capacity"
        return None

    banner = b""   # the far end speaks first, whatever it says

    async def serve_socket(self, sock: socket.socket, ctx: SessionContext, *,
                           banner_sent: bool = False) -> SessionResult:
        loop = asyncio.get_running_loop()
        if not self._relay_started:
            self._relay.start(self._finished)
            self._relay_started = True
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[RelayReport] = loop.create_future()
        self._waiting[rid] = fut
        upstream: socket.socket | None = None
        try:
            try:
                upstream = await connect_tcp(self.target, CONNECT_TIMEOUT)
                if self.proxy_protocol:
                    build = proxyproto.build_v2 if self.proxy_protocol == "v2" else proxyproto.build_v1
                    dst = upstream.getpeername()[:2]
                    await loop.sock_sendall(upstream, build((ctx.client_ip, ctx.client_port), dst))
            # UnicodeError: a target name the resolver's idna codec refuses (not an OSError)
            except (OSError, UnicodeError, asyncio.TimeoutError) as exc:
                if upstream is not None:
                    upstream.close()
                log.warning("session %s: client %s:%d: cannot reach %s: %s", ctx.session_id,
                            ctx.client_ip, ctx.client_port, self.target, exc or "timeout")
                return SessionResult(None, 0, 0, "upstream unreachable")
            if self._closing:   # the relay is closed or closing: the node is stopping
                upstream.close()
                return SessionResult(None, 0, 0, "node shutting down")
            self._record("session.connect", ctx, {"forward": str(self.target)})
            log.info("session %s: client %s:%d forwarded to %s", ctx.session_id, ctx.client_ip,
                     ctx.client_port, self.target)
            try:
                self._relay.add(rid, sock, upstream)
            except (OSError, RuntimeError) as exc:   # a failed add leaves us the sockets
                upstream.close()
                log.error("session %s: the relay refused it: %s", ctx.session_id, exc)
                self._record("session.disconnect", ctx, {"bytes_in": 0, "bytes_out": 0,
                                                         "reason": f"relay error: {exc}"})
                return SessionResult(None, 0, 0, "relay error")
            self._relayed[rid] = ctx
            task = asyncio.current_task()
            if task is not None:
                self._serving[rid] = task
            report = await fut
        finally:
            self._waiting.pop(rid, None)
            self._relayed.pop(rid, None)
            self._serving.pop(rid, None)
        revoked = rid in self._revoked
        self._revoked.discard(rid)
        result = SessionResult(None, report.bytes_a_to_b, report.bytes_b_to_a,
                               f"revoked: {BANNED}" if revoked else report.reason.value)
        detail = {"bytes_in": result.bytes_in, "bytes_out": result.bytes_out,
                  "duration": round(report.duration, 3), "reason": result.reason}
        if revoked:     # counted apart, as the SSH service's (edgegw_node_audit_events_total)
            detail["result"] = "revoked"
        self._record("session.disconnect", ctx, detail)
        log.info("session %s: client %s:%d done (%s) in=%d out=%d", ctx.session_id,
                 ctx.client_ip, ctx.client_port, result.reason, result.bytes_in,
                 result.bytes_out)
        return result

    def _finished(self, report: RelayReport) -> None:
        fut = self._waiting.get(report.session_id)
        if fut is not None and not fut.done():
            fut.set_result(report)

    def _record(self, kind: str, ctx: SessionContext, detail: dict) -> None:
        if self._audit is not None:
            self._audit.record(kind, session_id=ctx.session_id, client_ip=ctx.client_ip,
                               client_port=ctx.client_port, gateway=ctx.gateway, detail=detail)

    async def close(self) -> None:
        """End every session and wait (briefly) for them to report."""
        self._closing = True
        if self._checker is not None:
            self._checker.cancel()
            self._checker = None
        serving = list(self._serving.values())
        if self._relay_started:
            await self._relay.close()   # reports every running session (SHUTDOWN)
        # Let them record their session.disconnect: the node cancels what is left after this.
        if serving:
            await asyncio.wait(serving, timeout=5.0)
