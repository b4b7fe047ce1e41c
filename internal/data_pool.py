"""Pre-opened, pre-proven Data connections per gateway link.

Dialing and proving a Data connection costs a TCP handshake and a round trip on the session's
critical path. A few idle ones, proven with the link's pool key, let the gateway pair a client
the moment the node accepts; each is replaced as soon as it is used.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Callable

from edgegw.pnc import RemoteProtocolError, dataauth
from edgegw.sockio import recv_exact
from internal.data_dial import dial_pooled

if TYPE_CHECKING:
    from internal.gateway_link import GatewayLink

log = logging.getLogger("edgegw.node.pool")

Assigned = Callable[[int, socket.socket], None]  # must not block: spawn the session


class DataPool:
    def __init__(self, link: "GatewayLink", size: int, on_assigned: Assigned) -> None:
        self.link = link
        self.size = size
        self.on_assigned = on_assigned
        self.idle = 0           # proven connections not yet promised to an offer
        self._waiting: set[asyncio.Task[None]] = set()
        self._next_ident = 1
        self._failures = 0

    def take(self) -> bool:
        """Promise one idle connection to an offer we accept; False when none is idle."""
        if self.idle <= 0:
            return False
        self.idle -= 1
        return True

    def fill(self) -> None:
        """Dial until `size` connections are open or being opened."""
        while len(self._waiting) < self.size and self._failures < 3:
            task = asyncio.create_task(self._one())
            self._waiting.add(task)
            task.add_done_callback(self._done)

    def close(self) -> None:
        for task in list(self._waiting):
            task.cancel()
        self.idle = 0

    def _done(self, task: asyncio.Task[None]) -> None:
        self._waiting.discard(task)
        if not task.cancelled() and self.link.connected:
            self.fill()

    async def _one(self) -> None:
        link = self.link
        ident = self._next_ident
        self._next_ident += 1
        try:
            sock = await dial_pooled(link.data_addr, link.gateway.pool_key, ident)  # type: ignore[union-attr]
        except (OSError, asyncio.TimeoutError, ConnectionError, RemoteProtocolError) as exc:
            self._failures += 1
            log.debug("pooled data connection to %s failed: %s", link.target, exc)
            await asyncio.sleep(0.5)
            return
        self._failures = 0
        self.idle += 1
        try:
            session_id = dataauth.parse_assignment(await recv_exact(sock, dataauth.ASSIGN_LEN))
        except (OSError, ConnectionError, RemoteProtocolError) as exc:
            # Closed unassigned (gateway restart, link down): one idle connection fewer.
            self.idle = max(0, self.idle - 1)
            log.debug("pooled data connection to %s closed: %s", link.target, exc)
            sock.close()
            return
        except asyncio.CancelledError:   # the pool is closing (link down, node stopping)
            sock.close()
            raise
        # take() already counted this connection out of `idle`; the done-callback replaces it.
        self.on_assigned(session_id, sock)
