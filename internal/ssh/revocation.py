"""Account changes reach running sessions, not only the next login.

Every `interval` seconds each node process reads again, in one store query, the accounts of the
users with sessions in that process (no query at all while it has none). A session whose
account is gone, disabled or expired, whose address rules no longer allow its REAL client
address (`auth.account_refusal`, the rules a login is refused by), or whose address is banned,
is ended, as is one that logged in with a key since removed from the account or a password
since changed: one log line, a `session.revoked` audit event, and a disconnect whose audit
event and result carry the reason. Otherwise a changed record is handed to the service
(`Apply`), so the session's next SFTP operations follow the new permissions, root and quota.
Every process checks its own sessions, so all workers and all nodes on a shared store end
theirs within an interval.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import asyncssh

from internal.ssh.auth import Session, account_refusal, credential_refusal
from internal.store.base import Store, StoreError, User
from internal.store.calls import store_call

log = logging.getLogger("edgegw.node.session")

DEFAULT_INTERVAL = 2.0   # seconds: how late a disabled user's transfer may run on
BANNED = "address banned"

# Applies a user's newer record to that user's sessions here (which then take it as
# `session.user`); returns why it cannot be applied (the sessions are then ended), or None.
Apply = Callable[[User, list[Session]], Awaitable[str | None]]


class Revoker:
    """Checks this process's authenticated sessions against the store, every `interval`."""

    def __init__(self, store: Store, *, interval: float, banned: Callable[[str], bool],
                 apply: Apply) -> None:
        self.store = store
        self.interval = interval
        self._banned = banned
        self._apply = apply
        self._live: dict[Session, asyncssh.SSHServerConnection] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def track(self, session: Session, conn: asyncssh.SSHServerConnection) -> None:
        """Check `session` from now on (it counts once it has a user)."""
        self._live[session] = conn

    def forget(self, session: Session) -> None:
        self._live.pop(session, None)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except StoreError as exc:   # keep the sessions; the next interval tries again
                if not self._failing:
                    log.error("cannot re-check running sessions against the store (retrying "
                              "every %gs): %s", self.interval, exc)
                self._failing = True
                continue
            except Exception:
                log.exception("checking running sessions failed (retrying in %gs)",
                              self.interval)
                continue
            if self._failing:
                log.info("running sessions are checked against the store again")
                self._failing = False

    async def check(self) -> None:
        """One pass: end the sessions whose account no longer allows them, update the rest."""
        by_user: dict[str, list[Session]] = {}
        for session in self._live:
            if session.user is not None and not session.reason:   # not ending already
                by_user.setdefault(session.user.name, []).append(session)
        if not by_user:
            return
        found = await store_call(self.store.get_users, list(by_user))
        users = {u.name: u for u in found}
        now = time.time()
        for name, sessions in by_user.items():
            user = users.get(name)
            kept = []
            for session in sessions:
                if session not in self._live:      # ended while the store answered
                    continue
                ip = session.ctx.client_ip
                why = account_refusal(user, ip, now) or (BANNED if self._banned(ip) else None)
                if why is None and user is not None and session.user != user:
                    why = credential_refusal(session, user)
                if why is not None:
                    self.revoke(session, why)
                else:
                    kept.append(session)
            changed = [s for s in kept if s.user != user]
            if not changed:
                continue
            assert user is not None     # account_refusal refuses a missing user
            why = await self._apply(user, changed)
            if why is not None:
                for session in changed:
                    if session in self._live:
                        self.revoke(session, why)

    def revoke(self, session: Session, why: str) -> None:
        """End `session` now because of `why`: log, audit, disconnect."""
        conn = self._live.pop(session, None)
        if conn is None:
            return
        session.revoked = why
        session.reason = f"revoked: {why}"
        c = session.ctx
        log.info("session %s user=%s client=%s:%d revoked: %s", c.session_id, session.username,
                 c.client_ip, c.client_port, why)
        session.audit("session.revoked", reason=why, result="revoked")
        # Open uploads are aborted by the SFTP server's cleanup: nothing half-written is
        # published under its final name.
        conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"session ended by the server: {why}")
