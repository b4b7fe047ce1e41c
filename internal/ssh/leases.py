"""Session caps (`max_sessions`) counted in the store, across every node and worker.

Each process also counts its own sessions (auth.SessionCounter) to refuse early, but only the
store sees them all. A capped user's session takes a lease right after authentication; SFTP
waits for the answer, and over the cap the connection is closed before any request runs. The
lease is renewed while the session lives and dropped when it ends; a node that dies leaves
leases that lapse after SESSION_LEASE seconds.
"""
from __future__ import annotations

import asyncio
import logging
import time

import asyncssh

from internal.ssh.auth import Session
from internal.store.base import Store, StoreError
from internal.store.calls import store_call

log = logging.getLogger("edgegw.node.auth")

SESSION_LEASE = 60.0    # seconds; renewed every third of it


class SessionLeases:
    def __init__(self, store: Store, node_id: str) -> None:
        self.store = store
        self.node_id = node_id
        self._held: set[str] = set()            # session ids with a lease from this process
        self._renewed = time.monotonic()
        self._releasing: set[asyncio.Task[None]] = set()

    async def claim(self, session: Session, conn: asyncssh.SSHServerConnection) -> None:
        """Answer `session.claimed` (True: go on); over the cap, audit and disconnect."""
        claimed = session.claimed
        assert claimed is not None and not claimed.done()
        ok = False
        try:
            ok = await self._claim(session)
        finally:                        # cancelled or failed: no SFTP without an answer
            claimed.set_result(ok)
        if not ok:
            user = session.user
            assert user is not None
            session.reason = "too many sessions"
            session.audit("auth", method="session-cap", result="refused",
                          reason=f"too many sessions (limit {user.max_sessions})")
            conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS,
                            f"too many sessions for {user.name}")

    async def _claim(self, session: Session) -> bool:
        user = session.user
        if user is None or user.max_sessions is None:
            return True
        sid = session.ctx.session_id
        try:
            ok = await store_call(self.store.claim_session, sid, user.name, self.node_id,
                                  user.max_sessions, until=time.time() + SESSION_LEASE)
        except StoreError as exc:   # a broken store must not lock every capped user out
            log.error("session %s: cannot count %s's sessions in the store (allowed): %s",
                      sid, user.name, exc)
            return True
        if ok:
            self._held.add(sid)
        return ok

    def release(self, session_id: str) -> None:
        """The session ended: drop its lease (in the background)."""
        if session_id not in self._held:
            return
        self._held.discard(session_id)

        async def release() -> None:
            try:
                await store_call(self.store.release_session, session_id)
            except StoreError as exc:
                log.warning("session %s: cannot release its lease (it lapses in %.0fs): %s",
                            session_id, SESSION_LEASE, exc)
        task = asyncio.get_running_loop().create_task(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def renew(self) -> None:
        """Called every second or so; renews every third of the lease."""
        if self._held and time.monotonic() - self._renewed >= SESSION_LEASE / 3:
            self._renewed = time.monotonic()
            await store_call(self.store.renew_sessions, list(self._held),
                             time.time() + SESSION_LEASE)

    async def close(self) -> None:
        if self._releasing:
            await asyncio.wait(list(self._releasing), timeout=5.0)
