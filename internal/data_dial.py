"""Dial a gateway's Data port and prove which offer (or pool) the connection belongs to."""
from __future__ import annotations

import asyncio
import socket
from typing import Callable

from edgegw.netaddr import HostPort
from edgegw.pnc import dataauth
from edgegw.sockio import connect_tcp, recv_exact, set_keepalive

DIAL_TIMEOUT = 5.0


async def _dial_proven(addr: HostPort, proof: Callable[[bytes], bytes],
                       congestion: str) -> tuple[socket.socket, bytes]:
    """Dial the Data port, read the gateway's challenge, answer with proof(nonce)."""
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


async def dial_session(addr: HostPort, session_id: int, secret: bytes,
                       congestion: str = "") -> socket.socket:
    """A Data connection proven for one offer; the SSH stream starts right after the proof.
    `congestion`: its TCP congestion control ("" keeps the kernel's default)."""
    sock, _ = await _dial_proven(
        addr, lambda nonce: dataauth.session_proof(secret, session_id, nonce), congestion)
    return sock


async def dial_pooled(addr: HostPort, pool_key: bytes, ident: int,
                      congestion: str = "") -> tuple[socket.socket, bytes]:
    """A pre-opened Data connection proven with the link's pool key, and the challenge nonce
    its assignment will be bound to; it waits for that assignment."""
    return await _dial_proven(
        addr, lambda nonce: dataauth.pool_proof(pool_key, ident, nonce), congestion)
