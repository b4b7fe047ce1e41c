"""Who is on an SSH connection: the session record and the authentication hooks.

The user is read from the store when the client names it, so changes (keys, password, address
rules, disabled, expiry) apply to the next login without a restart; running sessions follow
them too (`internal.ssh.revocation`). Every rule is checked
against the REAL client address from the session context, never the socket's peer (for relayed
sessions that is the gateway). A refused user still goes through the motions of password
verification, so timing does not reveal which names exist or why a login failed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncssh

from internal.audit import AuditLog
from internal.defender import Defender
from internal.ipmatch import user_allows_ip
from internal.passwords import verify_password
from internal.sftp.errors import printable
from internal.session import SessionContext
from internal.store.base import Store, User
from internal.store.calls import store_call

log = logging.getLogger("edgegw.node.auth")

# Failed attempts (keys offered, passwords given) one connection may make before it is ended,
# as OpenSSH's MaxAuthTries (6 there; a few more here for clients with many keys in an agent).
# Every attempt is audited: without a cap one connection could write thousands of audit events
# in its login time, as keys count once towards the defender's bans.
MAX_AUTH_TRIES = 10

# Requests for anything but SFTP (a shell, a command, another subsystem, a port forward: a
# reach into the trusted network) one connection may make before it is ended. Each is refused,
# logged and audited; no SFTP client sends one, and the cap keeps a client from writing audit
# events as fast as it can ask.
MAX_REFUSED_REQUESTS = 10
# What is kept of a client's text (a command, a host name) in one log line or audit event.
_SHOWN_MAX = 200


class Session:
    """One SSH connection's identity and counters, shared by auth, SFTP and the service."""

    def __init__(self, ctx: SessionContext, audit_log: AuditLog) -> None:
        self.ctx = ctx
        self.user: User | None = None       # set once authentication succeeded
        self.attempted: str = ""            # the last user name the client tried
        self.bytes_in = 0                   # file data uploaded (client -> node)
        self.bytes_out = 0                  # file data downloaded
        self.started = time.monotonic()
        self.reason = ""                    # why it ended, once known
        self.revoked = ""                   # why the node ended it (internal.ssh.revocation)
        self.claimed: asyncio.Future[bool] | None = None   # the store's session-cap answer
        # what the client proved itself with: the key's wire form, or the password's hash
        self.credential: tuple[str, bytes | str | None] | None = None
        self._audit_log = audit_log

    @property
    def username(self) -> str:
        return self.user.name if self.user is not None else self.attempted

    def audit(self, kind: str, **detail: Any) -> None:
        """Record an event carrying this session's id, user and real client address."""
        c = self.ctx
        self._audit_log.record(kind, session_id=c.session_id, username=self.username,
                               client_ip=c.client_ip, client_port=c.client_port,
                               gateway=c.gateway, detail=detail)


class SessionCounter:
    """Sessions per user on this node, for `max_sessions`."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}

    def count(self, name: str) -> int:
        return self._count.get(name, 0)

    def acquire(self, name: str) -> None:
        self._count[name] = self._count.get(name, 0) + 1

    def release(self, name: str) -> None:
        left = self._count.get(name, 0) - 1
        if left > 0:
            self._count[name] = left
        else:
            self._count.pop(name, None)


def account_refusal(user: User | None, ip: str, now: float | None = None) -> str | None:
    """Why the account `user` may not be used from `ip` right now, or None when it may: what
    refuses a login and also ends a running session (`internal.ssh.revocation`)."""
    if user is None:
        return "no such user"
    if user.disabled:
        return "user disabled"
    if user.expires_at is not None and user.expires_at <= (now or time.time()):
        return "user expired"
    if not user_allows_ip(user, ip):
        return "address not allowed for this user"
    return None


def credential_refusal(session: Session, user: User) -> str | None:
    """Why `session` may not go on under the newer record `user` although the account still
    allows it: the key it logged in with was removed, or the password it gave was changed."""
    if session.credential is None:
        return None
    method, proof = session.credential
    if method == "publickey" and proof not in _key_blobs(user):
        return "its key was removed"
    if method == "password" and proof != user.password_hash:
        return "the password was changed"
    return None


class NodeSSHServer(asyncssh.SSHServer):
    """Authentication policy for one connection: password (argon2id) or public key."""

    def __init__(self, session: Session, store: Store, defender: Defender,
                 sessions: SessionCounter) -> None:
        self.session = session
        self._store = store
        self._defender = defender
        self._sessions = sessions
        self._conn: asyncssh.SSHServerConnection | None = None
        self._candidate: User | None = None
        self._keys: set[bytes] = set()
        self._method = ""
        self._key_failure_counted = False
        self._tries = 0     # failed attempts on this connection (MAX_AUTH_TRIES)
        self._store_failed = False   # the user could not be read: not the client's failure
        self._refused = 0   # requests for anything but SFTP (MAX_REFUSED_REQUESTS)

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.session.reason:
            self.session.reason = f"connection lost: {exc}" if exc else "closed"

    async def begin_auth(self, username: str) -> bool:
        self.session.attempted = username
        user = await self._read_user(username)
        # The session cap is checked once the client has proven who it is (auth_completed):
        # refused here, a partner's parallel or retried logins would count as failed ones
        # and get its address banned. Everything else refuses the account itself.
        why = "store unavailable" if self._store_failed else \
            account_refusal(user, self.session.ctx.client_ip)
        if why is not None:
            self._candidate, self._keys = None, set()
            self.session.audit("auth", method="begin", result="refused", reason=why)
            return True     # keep asking: failing every method later tells the client nothing
        assert user is not None
        self._candidate = user
        self._keys = _key_blobs(user)
        return True

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return False

    async def validate_password(self, username: str, password: str) -> bool:
        stored = self._candidate.password_hash if self._candidate is not None else None
        ok = await asyncio.to_thread(verify_password, stored, password)
        if ok and self._candidate is not None:
            self._method = "password"
            self.session.credential = ("password", stored)
            return True
        await self._failed("password")
        return False

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self._candidate is not None and key.public_data in self._keys:
            self._method = "publickey"
            self.session.credential = ("publickey", key.public_data)
            return True
        # A client tries each key it has; count that as one failure, not one per key.
        await self._failed("publickey", count=not self._key_failure_counted)
        self._key_failure_counted = True
        return False

    def auth_completed(self) -> None:
        user = self._candidate
        assert user is not None
        self.session.user = user
        self._sessions.acquire(user.name)
        self.session.audit("auth", method=self._method, result="ok")
        if user.max_sessions is not None and self._sessions.count(user.name) > user.max_sessions:
            self._disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS,   # audited by the lease claim
                             f"too many sessions for {user.name}", "too many sessions")

    # Only SFTP is served. asyncssh refuses every other channel and request by default, but
    # silently: these say so (session channels: internal.ssh.streams.ViewStreamSession).
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        self.refuse("direct-tcpip", f"{dest_host}:{dest_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self.refuse("direct-streamlocal", dest_path)
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self.refuse("tcpip-forward", f"{listen_host}:{listen_port}")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self.refuse("streamlocal-forward", listen_path)
        return False

    def refuse(self, request: str, target: str = "") -> None:
        """A request for anything but SFTP: one log line, one `ssh.refused` audit event, and
        the connection ended after MAX_REFUSED_REQUESTS of them."""
        shown = printable(target[:_SHOWN_MAX] + ("..." if len(target) > _SHOWN_MAX else ""))
        ctx = self.session.ctx
        log.info("refused: user=%s client=%s request=%s target=%s: only SFTP is served",
                 self.session.username or "-", ctx.client_ip, request, shown or "-")
        self.session.audit("ssh.refused", request=request, target=shown, result="refused",
                           reason="only SFTP is served")
        self._refused += 1
        if self._refused == MAX_REFUSED_REQUESTS:
            self._disconnect(asyncssh.DISC_BY_APPLICATION, "too many refused requests",
                             "too many refused requests")

    async def _read_user(self, username: str) -> User | None:
        """The account, asked twice: a pooled store connection the server closed while idle
        fails once. A store that cannot answer refuses the login (and is not the client's
        failure); it must not crash the connection."""
        for attempt in (1, 2):
            try:
                return await store_call(self._store.get_user, username)
            except Exception as exc:
                if attempt == 2:
                    log.error("cannot read user %r from the store: %s", username, exc)
        self._store_failed = True
        return None

    async def _failed(self, method: str, *, count: bool = True) -> None:
        self.session.audit("auth", method=method, result="failed")
        self._tries += 1
        if count and not self._store_failed:
            ip = self.session.ctx.client_ip
            ban = await store_call(self._defender.record_failure, ip)
            if ban is not None:
                self.session.audit("auth", method=method, result="banned", until=ban.until)
                self._disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                 "too many failed logins from your address", "banned")
                return
        if self._tries >= MAX_AUTH_TRIES:
            self._disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                             "too many authentication failures", "too many authentication "
                             "failures")

    def _disconnect(self, code: int, message: str, reason: str) -> None:
        self.session.reason = reason
        conn = self._conn
        if conn is not None:   # after the current auth step has been answered
            asyncio.get_running_loop().call_soon(conn.disconnect, code, message)


def _key_blobs(user: User) -> set[bytes]:
    """The wire form of each authorised key; a malformed line is logged and skipped."""
    blobs = set()
    for line in user.keys:
        try:
            blobs.add(asyncssh.import_public_key(line).public_data)
        except Exception as exc:   # asyncssh's decoders raise more than KeyImportError
            log.warning("user %s: ignoring unusable public key: %s", user.name, exc)
    return blobs
