"""Dial a gateway's Data port and prove which offer (or pool) the connection belongs to."""
from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import Callable

from edgegw.netaddr import HostPort
from edgegw.pnc import dataauth
from edgegw.sockio import connect_tcp, recv_exact, set_keepalive

log = logging.getLogger("edgegw.node")

DIAL_TIMEOUT = 5.0
RETRY_MIN = 0.05   # first pause before a session's Data connection is dialed again; doubles
RETRY_MAX = 0.5

# Data connections a gateway link has between dial and proof at once, pooled and per-session
# alike. The gateway closes those beyond --max-handshakes-per-address (128 by default) from one
# address at accept: a burst of offers dialed all at once went over it with two workers on one
# host. Dials beyond this wait their turn, each taking about one round trip.
MAX_DIALS = 32


def dial_slots() -> asyncio.Semaphore:
    """The MAX_DIALS limit, one per gateway link."""
    return asyncio.Semaphore(MAX_DIALS)


async def _dial_proven(addr: HostPort, proof: Callable[[bytes], bytes], congestion: str,
                       slots: asyncio.Semaphore) -> tuple[socket.socket, bytes]:
    """Dial the Data port, read the gateway's challenge, answer with proof(nonce)."""
    async with slots:
        sock = await connect_tcp(addr, DIAL_TIMEOUT, congestion)  # checked at startup
        set_keepalive(sock)  # pooled ones idle between sessions, maybe through a firewall
        try:
            nonce = dataauth.parse_challenge(
                await asyncio.wait_for(recv_exact(sock, dataauth.CHALLENGE_LEN), DIAL_TIMEOUT))
            await asyncio.get_running_loop().sock_sendall(sock, proof(nonce))
            return sock, nonce
        except BaseException:
            sock.close()
            raise


async def dial_session(addr: HostPort, session_id: int, secret: bytes, slots: asyncio.Semaphore,
                       deadline: float, congestion: str = "") -> socket.socket:
    """A Data connection proven for one offer; the SSH stream starts right after the proof.
    `congestion`: its TCP congestion control ("" keeps the kernel's default).

    A connection refused, reset or closed before the challenge (the gateway's handshake cap
    for this address was full, or its loop was behind) is dialed again after a pause while
    `deadline` (loop time; the offer's end) allows it; when the next pause would pass it, that
    ConnectionError is raised, and asyncio.TimeoutError for a dial still out at the deadline.
    A bad challenge is not retried."""
    loop = asyncio.get_running_loop()
    pause = RETRY_MIN
    while True:
        try:
            sock, _ = await asyncio.wait_for(
                _dial_proven(addr, lambda nonce: dataauth.session_proof(secret, session_id, nonce),
                             congestion, slots),
                max(deadline - loop.time(), 0))
            return sock
        except ConnectionError as exc:
            wait = pause * random.uniform(0.5, 1.5)
            if loop.time() + wait >= deadline:
                raise
            log.debug("session %016x: Data connection to %s failed (%s); again in %.0f ms",
                      session_id, addr, exc, wait * 1000)
            await asyncio.sleep(wait)
            pause = min(pause * 2, RETRY_MAX)


async def dial_pooled(addr: HostPort, pool_key: bytes, ident: int, slots: asyncio.Semaphore,
                      congestion: str = "") -> tuple[socket.socket, bytes]:
    """A pre-opened Data connection proven with the link's pool key, and the challenge nonce
    its assignment will be bound to; it waits for that assignment."""
    return await _dial_proven(
        addr, lambda nonce: dataauth.pool_proof(pool_key, ident, nonce), congestion, slots)
