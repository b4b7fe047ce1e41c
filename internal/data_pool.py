"""Pre-opened, pre-proven Data connections per gateway link.

Dialing and proving a Data connection costs a TCP handshake and a round trip on the session's
critical path. A few idle ones, proven with the link's pool key, let the gateway hand a client
over the moment it connects: the assignment it writes on one carries the client's address, so no
PNC round trip is needed either. Used ones are replaced in batches (see QUIET).
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import TYPE_CHECKING, Callable

from edgegw.pnc import RemoteProtocolError, dataauth
from edgegw.sockio import recv_exact
from internal.data_dial import dial_pooled

if TYPE_CHECKING:
    from internal.gateway_link import GatewayLink

log = logging.getLogger("edgegw.node.pool")

# Per gateway link, by default. Used ones are replaced in batches of three quarters of the pool
# (see QUIET); under a steady stream of new sessions a larger pool means fewer, larger refills,
# which cost the sessions set up meanwhile less than many small ones (back-to-back connections,
# setup p50 through the gateway over the direct node's: about 290 µs at 8, 205 µs at 32).
DEFAULT_SIZE = 32

# Used connections are replaced in a batch once sessions have stopped arriving for QUIET
# seconds, or at once when only LOW_WATER of them are left: dialing and proving them on both
# ends would otherwise compete with the new sessions' SSH setup for the loop.
QUIET = 0.02

# The gateway assigns a client to a pooled connection whenever it holds one, and offers it over
# the PNC only when it holds none. So an offer while one of ours has been proven for this long
# and has nothing waiting to be read means the gateway no longer has that connection (it found
# the pool silent and dropped it, or a firewall lost its state), though our end has not noticed
# yet: dial fresh ones. One with bytes waiting holds an assignment this loop has not read yet: a
# burst of clients takes the whole pool, and the offers after it can be read here first.
STALE_AFTER = 1.0

# After MAX_FAILURES dials in a row failed, the pool stops dialing and tries a single one
# after a backoff that doubles from RETRY_MIN to RETRY_MAX (with jitter) per retry that fails:
# a gateway that refused or dropped them (a restart, its handshake cap full during a flood)
# gets them back once it takes them again, without being dialed in a loop meanwhile.
MAX_FAILURES = 3
RETRY_MIN = 1.0
RETRY_MAX = 30.0

# Must not block: answer on the socket and spawn the session (or close it).
Assigned = Callable[[dataauth.Assignment, socket.socket], None]


class DataPool:
    def __init__(self, link: "GatewayLink", size: int, on_assigned: Assigned, *,
                 congestion: str = "") -> None:
        self.link = link
        self.size = size
        self.on_assigned = on_assigned
        self.congestion = congestion
        self._waiting: set[asyncio.Task[None]] = set()
        # loop time each was proven at, and its socket
        self._proven: dict[asyncio.Task[None], tuple[float, socket.socket]] = {}
        self._next_ident = 1
        self._failures = 0
        # Backoff rounds since a connection last served or lived (a mere proof is not enough:
        # a gateway that closes them right after it must still see the backoff grow). The
        # delay doubles per round, not per failed dial: a whole pool failing at once (a
        # gateway restart) is one round, not 32 doublings.
        self._rounds = 0
        self._last_use = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None

    @property
    def low_water(self) -> int:
        return max(1, self.size // 4)

    def fill(self) -> None:
        """Dial until `size` connections are open or being opened; after MAX_FAILURES failed
        dials in a row, one more after a backoff."""
        if self._failures >= MAX_FAILURES:
            self._schedule_retry()
            return
        while len(self._waiting) < self.size and self._failures < MAX_FAILURES:
            self._dial()

    def _dial(self) -> None:
        task = asyncio.create_task(self._one())
        self._waiting.add(task)
        task.add_done_callback(self._done)

    def _schedule_retry(self) -> None:
        if self._retry is not None or self._waiting or not self.link.connected:
            return   # one already planned, or a dial still out decides first
        delay = min(RETRY_MAX, RETRY_MIN * 2 ** min(self._rounds, 30))
        delay *= random.uniform(0.8, 1.2)
        self._rounds += 1
        log.warning("pooled data connections to %s: %d dials in a row failed; trying again in "
                    "%.1fs (sessions are offered over the PNC meanwhile)", self.link.target,
                    self._failures, delay)
        self._retry = asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self.link.connected and not self._waiting:
            self._dial()   # proven: fill() from there; failed: _done() plans the next retry

    def offered(self) -> None:
        """The gateway offered a client over the PNC: replace the connections it must have
        lost (see STALE_AFTER)."""
        now = asyncio.get_running_loop().time()
        stale = [t for t, (at, sock) in self._proven.items()
                 if now - at >= STALE_AFTER and not _has_input(sock)]
        if not stale:
            return
        log.warning("gateway %s offered over the PNC while %d pooled data connection(s) sat "
                    "idle: it no longer has them; replacing them", self.link.target, len(stale))
        for task in stale:
            self._waiting.discard(task)
            self._proven.pop(task, None)
            task.cancel()
        if self.link.connected:
            self.fill()

    def close(self) -> None:
        for timer in (self._timer, self._retry):
            if timer is not None:
                timer.cancel()
        self._timer = self._retry = None
        for task in list(self._waiting):
            task.cancel()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._waiting.discard(task)
        self._proven.pop(task, None)
        if task.cancelled() or not self.link.connected:
            return
        if len(self._waiting) <= self.low_water:
            self.fill()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(QUIET, self._refill_when_quiet)

    def _refill_when_quiet(self) -> None:
        self._timer = None
        if not self.link.connected:
            return
        loop = asyncio.get_running_loop()
        quiet_for = loop.time() - self._last_use
        if quiet_for >= QUIET or len(self._waiting) <= self.low_water:
            self.fill()
        else:
            self._timer = loop.call_later(QUIET - quiet_for, self._refill_when_quiet)

    async def _one(self) -> None:
        link = self.link
        gateway = link.gateway
        assert gateway is not None
        ident = self._next_ident
        self._next_ident += 1
        try:
            sock, nonce = await dial_pooled(link.data_addr, gateway.pool_key, ident, link.dials,
                                            self.congestion)
        except (OSError, asyncio.TimeoutError, ConnectionError, RemoteProtocolError) as exc:
            self._failures += 1
            log.debug("pooled data connection to %s failed: %s", link.target, exc)
            await asyncio.sleep(0.5)
            return
        recovered = self._failures >= MAX_FAILURES
        self._failures = 0
        if recovered:
            log.info("pooled data connections to %s: dialing works again", link.target)
            if link.connected:
                self.fill()   # the rest of the pool, which stopped dialing
        me = asyncio.current_task()
        proven_at = asyncio.get_running_loop().time()
        if me is not None:
            self._proven[me] = (proven_at, sock)
        try:
            wire = await recv_exact(sock, dataauth.ASSIGN_LEN)
            assignment = dataauth.parse_assignment(wire, gateway.pool_key, nonce, ident)
        except RemoteProtocolError as exc:
            log.warning("pooled data connection to %s: bad assignment (%s); closed",
                        link.target, exc)
            sock.close()
            return
        except (OSError, ConnectionError) as exc:
            # Closed unassigned (gateway restart, link down): the done-callback replaces it.
            log.debug("pooled data connection to %s closed: %s", link.target, exc)
            sock.close()
            if asyncio.get_running_loop().time() - proven_at < STALE_AFTER:
                # Closed right after its proof: the gateway does not take them (it dropped
                # this link, or is hostile). Count it as a failed dial, or the pool would
                # replace it at once, in a tight loop.
                self._proven.pop(me, None)  # type: ignore[arg-type]
                self._failures += 1
                await asyncio.sleep(0.5)
            else:
                self._rounds = 0   # it lived: the gateway took it
            return
        except asyncio.CancelledError:   # pool closing (link down, node stopping), or stale
            sock.close()
            raise
        self._last_use = asyncio.get_running_loop().time()
        self._rounds = 0
        self.on_assigned(assignment, sock)


def _has_input(sock: socket.socket) -> bool:
    """Bytes wait on it (an assignment), or its end or an error: its task will see to it."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True
