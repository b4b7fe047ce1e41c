"""The node's SSH service: runs asyncssh on relayed Data connections and on a direct listener.

Both paths end in `serve_socket`, with the session context carrying the REAL client address (the
gateway's offer, or the peer of a direct connection). `admit` answers the gateway's offers from
caches refreshed in the background every second, so it never waits on the store.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Callable

import asyncssh

from edgegw.acceptor import Acceptor
from edgegw.netaddr import HostPort
from edgegw.sockio import ClientCongestion, listen_socket
from internal import passwords
from internal.audit import AuditLog
from internal.defender import Defender
from internal.home import NodeHome
from internal.ipmatch import banned_by, user_allows_ip
from internal.session import SessionContext, SessionResult
from internal.sftp.quota import QuotaBook, Usage, give_back
from internal.sftp.server import NodeSFTPServer
from internal.sftp.temps import sweep_temps
from internal.sftp.uploads import PARTIAL_SUFFIXES
from internal.ssh.algorithms import algorithm_options
from internal.ssh.auth import NodeSSHServer, Session, SessionCounter
from internal.ssh.leases import SessionLeases
from internal.ssh.revocation import DEFAULT_INTERVAL as REVOKE_INTERVAL, Revoker
from internal.ssh.transport import run_server
from internal.store.base import BanEntry, Store, User
from internal.store.calls import store_call

log = logging.getLogger("edgegw.node.ssh")
session_log = logging.getLogger("edgegw.node.session")

REFRESH_INTERVAL = 1.0
# An upload temporary no live upload holds (temps.temp_in_use) and untouched this long is a
# crashed session's; the sweep runs at startup and then every SWEEP_INTERVAL.
STALE_UPLOAD_AGE = 60.0
SWEEP_INTERVAL = 900.0
SERVER_VERSION = "edgegw"
# Channel flow control, client -> node. OpenSSH's sftp writes min(our limits@openssh.com answer,
# 255 KiB) per request; a 256 KiB maximum packet lets each arrive as one SSH packet instead of
# eight 32 KiB ones (+15-20 % upload, bench/sftp_profile.py). A larger window measured no
# better, so it stays at OpenSSH's 2 MiB, which bounds what a session can make us buffer.
CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_MAX_PKTSIZE = 256 * 1024


# Takes a direct client's connection (and its address) over: a node's (Node.serve_direct), so
# that its drain, capacity and load count direct sessions as they count relayed ones.
OnDirect = Callable[[socket.socket, str, int], None]


class Listener:
    """A direct (`--listen`) SSH listener on the trusted network."""

    def __init__(self, sock: socket.socket, service: "SSHService",
                 on_client: OnDirect | None = None,
                 congestion: ClientCongestion | None = None) -> None:
        self._sock = sock
        self._service = service
        self._on_client = on_client
        self._congestion = congestion
        self.port: int = sock.getsockname()[1]
        self._acceptor = Acceptor(f"ssh port {self.port}", sock, self._accepted)
        self._acceptor.start()

    def _accepted(self, conn: socket.socket, peer: tuple) -> None:
        ip, port = str(peer[0]), int(peer[1])
        if self._congestion is not None:
            self._congestion.settle(conn)   # before the server's version line goes out
        if self._on_client is not None:
            self._on_client(conn, ip, port)
            return
        reason = self._service.admit(ip)
        if reason is not None:
            log.info("refused direct connection from %s:%d: %s", ip, port, reason)
            conn.close()
            return
        self._service.spawn(conn, SessionContext("", ip, port, ""))

    def close(self) -> None:
        self._acceptor.close()
        self._sock.close()


class SSHService:
    """SSH/SFTP for the node's users; see `internal.session.SessionService`."""

    def __init__(self, home: NodeHome, store: Store, audit: AuditLog, defender: Defender, *,
                 capacity: int = 0, login_timeout: float = 30.0,
                 durable_uploads: bool = True,
                 banned: Callable[[str], bool] | None = None,
                 recheck_interval: float = REVOKE_INTERVAL,
                 partial_suffixes: tuple[bytes, ...] = PARTIAL_SUFFIXES) -> None:
        """`banned`: the node's view of the bans (the one it pushes to gateways), so a client a
        gateway lets through after an unban is not refused here by an older copy.
        `recheck_interval`: seconds between two checks of running sessions against their
        accounts and the bans (`internal.ssh.revocation`).
        `partial_suffixes`: names that are clients' own temporaries, written in place."""
        self.home = home
        self.store = store
        self.audit = audit
        self.defender = defender
        self.capacity = capacity
        self.durable_uploads = durable_uploads
        self.partial_suffixes = partial_suffixes
        # HomeError, naming the file, for an unreadable host key or none at all
        self._options = asyncssh.SSHServerConnectionOptions(
            server_host_keys=home.host_keys(), login_timeout=login_timeout,
            connect_timeout=login_timeout + 5, server_version=SERVER_VERSION,
            allow_scp=False, agent_forwarding=False, x11_forwarding=False, allow_pty=False,
            sftp_version=3, keepalive_interval=60, send_server_host_keys=True,
            window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PKTSIZE,
            gss_host=None, gss_kex=False, gss_auth=False,  # no GSSAPI, no getfqdn() lookup
            **algorithm_options())
        self._sessions = SessionCounter()   # this process's; the store counts across nodes
        self._leases = SessionLeases(store, home.node_id)
        self._quotas = QuotaBook()
        self._active = 0
        self._conns: dict[asyncssh.SSHServerConnection, Session] = {}
        self._tasks: set[asyncio.Task[SessionResult]] = set()
        self._listeners: list[Listener] = []
        self._bans: list[BanEntry] = []
        self._banned = banned
        self._users: list[User] | None = None   # None until first loaded: admit fails open
        self._open_to_all = False
        self._refresher: asyncio.Task[None] | None = None
        self._sftp: dict[Session, set[NodeSFTPServer]] = {}   # open SFTP channels per session
        self._revoker = Revoker(store, interval=recheck_interval, banned=self._is_banned,
                                apply=self._apply_user)

    @property
    def active(self) -> int:
        return self._active

    # -- offers -----------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(passwords.prepare)
        try:
            await self.refresh()
        except Exception as exc:  # the refresher keeps trying; admit fails open until then
            log.error("cannot load bans/users from the store: %s", exc)
        self._start_refresher()

    def admit(self, client_ip: str) -> str | None:
        """Layer-7 decision for an offer, from memory only; authentication checks again."""
        self._start_refresher()
        if self._is_banned(client_ip):
            return "banned"
        if self.capacity and self._active >= self.capacity:
            return "capacity"
        users = self._users
        if users is not None and not self._open_to_all and \
                not any(user_allows_ip(u, client_ip) for u in users):
            return "no user may connect from this address"
        return None

    def _is_banned(self, client_ip: str) -> bool:
        """From memory: the node's view of the bans, or this service's copy."""
        if self._banned is not None:
            return self._banned(client_ip)
        now = time.time()
        return banned_by(client_ip, [b.ip for b in self._bans if b.until > now])

    async def refresh(self) -> None:
        """Reload users, and bans unless the node's view is used (`banned`), now (the
        background task does this every second)."""
        if self._banned is None:
            bans, users = await asyncio.gather(store_call(self.defender.active_bans),
                                               store_call(self.store.list_users))
            self._bans = bans
        else:  # the node's ban sync already reads them every second
            users = await store_call(self.store.list_users)
        now = time.time()
        usable = [u for u in users
                  if not u.disabled and (u.expires_at is None or u.expires_at > now)]
        self._users = usable
        self._open_to_all = any(not u.allow_cidrs and not u.deny_cidrs for u in usable)

    def _start_refresher(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
            self._revoker.start()

    async def _refresh_loop(self) -> None:
        next_sweep = 0.0
        while True:
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL
                try:
                    await asyncio.to_thread(self._sweep)
                except Exception:
                    log.exception("sweep of stale upload temporaries failed")
            try:
                await self.refresh()
            except Exception as exc:
                log.error("cannot refresh bans/users from the store (keeping the old): %s", exc)
            try:
                await self._leases.renew()
            except Exception as exc:
                log.error("cannot renew session leases in the store: %s", exc)
            await asyncio.sleep(REFRESH_INTERVAL)

    def _sweep(self) -> None:
        """Temporaries of uploads interrupted by a crash. Other nodes sharing the files root
        may be writing theirs right now: a live upload holds a lock on its temporary, and only
        those nobody holds and untouched for a minute go."""
        homes = [os.fsencode(u.home) for u in self.store.list_users()]
        roots = {str(self.home.files_root)} | set(map(os.fsdecode, homes))
        freed: dict[bytes, int] = {}

        def expired(directory: bytes, size: int) -> None:   # kept cut-off data: quota
            for home in homes:
                if directory == home or directory.startswith(home.rstrip(b"/") + b"/"):
                    freed[home] = freed.get(home, 0) + size
                    return

        removed = sum(sweep_temps(r, older_than=STALE_UPLOAD_AGE, expired=expired)
                      for r in sorted(roots) if os.path.isdir(r))
        for home, size in freed.items():
            try:
                give_back(home, size)
            except OSError as exc:
                log.warning("cannot give %d bytes back to the quota of %r: %s", size, home, exc)
        if removed:
            log.info("removed %d upload temporaries left by an earlier run or kept too long",
                     removed)

    # -- sessions ---------------------------------------------------------------------------
    def spawn(self, sock: socket.socket, ctx: SessionContext) -> asyncio.Task[SessionResult]:
        task = asyncio.get_running_loop().create_task(self.serve_socket(sock, ctx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def banner(self) -> bytes:
        """The SSH version line this server starts every connection with."""
        return b"SSH-2.0-" + self._options.version + b"\r\n"

    async def serve_socket(self, sock: socket.socket, ctx: SessionContext, *,
                           banner_sent: bool = False) -> SessionResult:
        """Run SSH on a connected socket until the connection ends; never raises for the
        client's misbehaviour, only reports it in the result. `banner_sent`: the caller has
        already written `banner` on the socket."""
        self._start_refresher()
        if not ctx.session_id:
            ctx = dataclasses.replace(ctx, session_id=secrets.token_hex(8))
        session = Session(ctx, self.audit)
        session.claimed = asyncio.get_running_loop().create_future()
        server = NodeSSHServer(session, self.store, self.defender, self._sessions)
        # A copy of the options prepared once, not asyncssh's per-connection re-preparation
        # (which re-validates every algorithm list and reloads keys, twice per connection):
        # only the two per-session factories differ.
        options = copy.copy(self._options)
        options.protocol_factory = lambda: server
        options.sftp_factory = functools.partial(self._open_sftp, session)
        self._active += 1
        session.audit("session.connect")
        conn: asyncssh.SSHServerConnection | None = None
        try:
            conn = await run_server(sock, options, banner_sent=banner_sent)
            self._conns[conn] = session
            self._revoker.track(session, conn)
            await self._leases.claim(session, conn)
            await conn.wait_closed()
            await self._sftp_closed(session)
        except (asyncssh.Error, OSError, asyncio.TimeoutError, EOFError) as exc:
            session.reason = session.reason or _describe(exc)
        except asyncio.CancelledError:
            session.reason = session.reason or "cancelled by the node"
            if conn is not None:
                conn.abort()
            raise
        except Exception as exc:
            # asyncssh ends a connection whose handling raised anything else (e.g. a client's
            # key blob its decoder chokes on with OverflowError) and hands that to the
            # handshake: one client's doing, not the node's. After the handshake it is ours.
            session.reason = session.reason or _describe(exc)
            if conn is None:
                log.debug("session %s: handshake failed", ctx.session_id, exc_info=True)
            else:
                log.error("session %s: ended on an unexpected error", ctx.session_id,
                          exc_info=True)
                conn.abort()
        finally:
            if conn is None:
                sock.close()
            else:
                self._conns.pop(conn, None)
                self._revoker.forget(session)
            self._leases.release(session.ctx.session_id)
            if not session.claimed.done():
                session.claimed.set_result(False)
            self._active -= 1
            if session.user is not None:
                self._sessions.release(session.user.name)
            result = self._finish(session)
        return result

    def _finish(self, session: Session) -> SessionResult:
        duration = time.monotonic() - session.started
        reason = session.reason or "closed"
        # a revoked session's end is counted apart (edgegw_node_audit_events_total{result})
        extra = {"result": "revoked"} if session.revoked else {}
        session.audit("session.disconnect", bytes_in=session.bytes_in,
                      bytes_out=session.bytes_out, duration=round(duration, 3), reason=reason,
                      **extra)
        c = session.ctx
        session_log.info("session %s user=%s client=%s:%d gateway=%s in=%d out=%d "
                         "duration=%.1fs reason=%s", c.session_id, session.username or "-",
                         c.client_ip, c.client_port, c.gateway or "-", session.bytes_in,
                         session.bytes_out, duration, reason)
        return SessionResult(username=session.user.name if session.user else None,
                             bytes_in=session.bytes_in, bytes_out=session.bytes_out,
                             reason=reason)

    async def _open_sftp(self, session: Session, chan: asyncssh.SSHServerChannel
                         ) -> NodeSFTPServer:
        user = session.user
        if user is None:    # asyncssh opens channels only after auth; belt and braces
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "not authenticated")
        assert session.claimed is not None  # made with the session, answered after auth
        if not await asyncio.shield(session.claimed):
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "too many sessions")
        # set with an older version, or by another node's CLI on a shared store
        problem = await asyncio.to_thread(self.home.unsafe_user_root, Path(user.home))
        if problem is not None:
            log.error("user %s: SFTP refused: %s; give the user another root with `edgegw "
                      "internal user set %s --home-dir DIR`", user.name, problem, user.name)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "this account's files are misconfigured on the "
                                            "server")
        await asyncio.to_thread(os.makedirs, user.home, 0o750, True)
        usage = await self._quotas.acquire(user)
        server = NodeSFTPServer(chan, session, user, usage, durable=self.durable_uploads,
                                partial_suffixes=self.partial_suffixes,
                                on_exit=lambda: self._sftp_exited(session, server),
                                unmetered=functools.partial(self._quotas.unmetered, user.name))
        self._sftp.setdefault(session, set()).add(server)
        current = session.user
        if current is not None and current is not user:  # changed (root checked) meanwhile
            await self._update_sftp(current, [(session, server)])   # a quota share if due
        return server

    async def _sftp_closed(self, session: Session, timeout: float = 5.0) -> None:
        """Until asyncssh has closed the handles the session's SFTP channels left open (after
        the connection ends), so that their bytes are in the session's record."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while session in self._sftp and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def _sftp_exited(self, session: Session, server: NodeSFTPServer) -> None:
        servers = self._sftp.get(session)
        if servers is not None:
            servers.discard(server)
            if not servers:
                del self._sftp[session]
        if server.usage is not None:    # only a channel that took a share of the quota book
            self._quotas.release(server.username)

    async def _apply_user(self, user: User, sessions: list[Session]) -> str | None:
        """`user`'s record changed while these sessions run (Revoker): their next SFTP
        operations follow its permissions, root and quota. Why it cannot be, or None."""
        moved = any(s.user is not None and s.user.home != user.home for s in sessions)
        if moved:   # what _open_sftp checks of a root, for the new one
            problem = await asyncio.to_thread(self.home.unsafe_user_root, Path(user.home))
            if problem is not None:
                log.error("user %s: new root refused: %s", user.name, problem)
                return "user root misconfigured"
            try:
                await asyncio.to_thread(os.makedirs, user.home, 0o750, True)
            except OSError as exc:
                log.error("user %s: cannot create the new root: %s", user.name, exc)
                return "user root unusable"
        await self._quotas.update(user, rescan=moved)
        servers = [(session, server) for session in sessions
                   for server in list(self._sftp.get(session, ()))]
        for session in sessions:    # first: a channel opened meanwhile follows it (_open_sftp)
            session.user = user
        await self._update_sftp(user, servers)
        return None

    async def _update_sftp(self, user: User,
                           servers: list[tuple[Session, NodeSFTPServer]]) -> None:
        """These channels of `user` follow its newer record. Those without a quota share take
        one if it now has a quota: all at once, once the figures count what they changed
        while the share was made (QuotaBook.share)."""
        shares: dict[NodeSFTPServer, Usage] = {}
        if user.quota_bytes is not None or user.quota_files is not None:
            unshared = [server for _, server in servers if server.usage is None]
            if unshared:
                usage = await self._quotas.share(user, len(unshared),
                                                 functools.partial(self._metered, user.name))
                shares = dict.fromkeys(unshared, usage)
        # no await from here on: no channel changes files between the check and the shares
        for session, server in servers:
            if server in shares and server not in self._sftp.get(session, ()):
                self._quotas.release(user.name)     # the channel closed meanwhile
                continue
            server.update(user, shares.get(server, server.usage))

    def _metered(self, username: str) -> bool:
        """Whether a channel of the user here charges a quota share already."""
        return any(server.username == username and server.usage is not None
                   for servers in self._sftp.values() for server in servers)

    # -- direct mode and shutdown -------------------------------------------------------------
    async def listen(self, host: str, port: int, *, reuse_port: bool = False,
                     on_client: OnDirect | None = None,
                     congestion: ClientCongestion | None = None) -> Listener:
        """Accept SSH clients directly (trusted network); the peer address is the client's.
        `reuse_port`: worker processes of one node share the port. `on_client`: who admits
        and serves each client (by default this service, on its own). `congestion`: their
        TCP congestion control, as the gateway's clients get theirs (None: the kernel's)."""
        sock = listen_socket(HostPort(host, port), 128, reuse_port=reuse_port,
                             congestion=congestion.listener if congestion else "")
        self._start_refresher()
        listener = Listener(sock, self, on_client, congestion)
        self._listeners.append(listener)
        return listener

    async def close(self) -> None:
        """Stop listening, end every session, and wait (briefly) for them to report."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        await self._revoker.close()
        for conn, session in list(self._conns.items()):
            session.reason = session.reason or "node shutting down"
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, "server shutting down")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        await self._leases.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError):
        return f"disconnected: {exc.reason}" if exc.reason else "disconnected"
    if isinstance(exc, asyncio.TimeoutError):
        return "login timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
