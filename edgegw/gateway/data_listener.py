"""The Data port: nodes dial in, prove which offer (or pool) a connection belongs to, or go."""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from edgegw.gateway.peers import MAX_POOLED, PooledData
from edgegw.pnc import RemoteProtocolError
from edgegw.pnc import dataauth
from edgegw.sockio import recv_exact

if TYPE_CHECKING:
    from edgegw.gateway.server import Gateway

log = logging.getLogger("edgegw.gateway.data")


async def handle_data_connection(gw: "Gateway", sock: socket.socket, addr: tuple) -> None:
    where = f"{addr[0]}:{addr[1]}"
    say = gw.data_log.log   # anyone can dial this port: one line per connection is a flood
    loop = asyncio.get_running_loop()
    handed_over = False
    try:
        nonce, wire = dataauth.make_challenge()
        await loop.sock_sendall(sock, wire)
        raw = await asyncio.wait_for(recv_exact(sock, dataauth.PROOF_LEN),
                                     gw.config.proof_timeout)
        proof = dataauth.parse_proof(raw)
        if proof.kind == dataauth.KIND_SESSION:
            offer = gw.offers.claim(proof.ident)
            if offer is None:
                say("no_offer", logging.WARNING, "data connection from %s: no live offer %016x "
                    "(unknown, used or expired); closed", where, proof.ident)
                return
            if not dataauth.verify_session_proof(proof, offer.secret, nonce):
                say("wrong_proof", logging.WARNING,
                    "data connection from %s: wrong proof for offer %016x; closed", where,
                    proof.ident)
                return
            offer.data.set_result(sock)
            handed_over = True
        else:
            for peer in gw.peers.peers:
                if dataauth.verify_pool_proof(proof, peer.pool_key, nonce):
                    if len(peer.pool) >= MAX_POOLED:
                        # A refill that loops (a bug, or a hostile node host) would otherwise
                        # hold descriptors without bound, and client accepts would fail.
                        gw.counters.pooled_refused += 1
                        say("pool_limit", logging.WARNING,
                            "data connection from %s: node %s already holds %d pooled data "
                            "connections; closed", where, peer.node_id, len(peer.pool))
                        return
                    peer.pool.append(PooledData(sock, nonce, proof.ident))
                    handed_over = True
                    log.debug("node %s: pooled data connection %d ready (%d idle)",
                              peer.node_id, proof.ident, len(peer.pool))
                    return
            say("no_node", logging.WARNING,
                "data connection from %s: pool proof matches no attached node; closed", where)
    except asyncio.TimeoutError:
        say("timeout", logging.WARNING, "data connection from %s: no proof within %.1fs; closed",
            where, gw.config.proof_timeout)
    except RemoteProtocolError as exc:
        say("bad_proof", logging.WARNING, "data connection from %s: bad proof (%s); closed", where,
            exc)
    except (ConnectionError, OSError) as exc:
        say("lost", logging.INFO, "data connection from %s: %s", where, exc)
    finally:
        if not handed_over:
            sock.close()
