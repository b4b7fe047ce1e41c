"""A node for measuring the gateway as a single relay hop.

`python -m bench.handoff_node --home H --gateway HOST:PORT --fdsock PATH`

The real node (its PNC link, pooled Data connections, admission) with one session service
swapped: instead of running SSH or relaying to a TCP service (a second relay hop), it hands the
node's end of each Data connection to the C program listening on the Unix socket PATH
(`netload echo|sink PORT PATH`), as SCM_RIGHTS. The bytes a client sends through the gateway
then end in that C program, as they end in HAProxy's backend: client -> gateway -> C end, one
hop, whose CPU is the gateway's alone.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import socket

from edgegw.logsetup import setup_logging
from edgegw.netaddr import parse_hostport
from edgegw.runner import run_until_signalled
from internal.data_pool import DEFAULT_SIZE as DEFAULT_POOL_SIZE
from internal.home import HomeError, NodeHome
from internal.node import Node, NodeSettings
from internal.session import SessionContext, SessionResult

log = logging.getLogger("edgegw.bench.handoff")


class HandoffService:
    """SessionService that gives each connection away; the C end owns it from then on."""

    def __init__(self, fdsock: str) -> None:
        self._path = fdsock
        self._sock: socket.socket | None = None

    @property
    def active(self) -> int:
        return 0   # handed-off sessions are not the node's to count

    async def start(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.connect(self._path)

    def admit(self, client_ip: str) -> str | None:
        return None

    banner = b""   # the far end speaks first, whatever it says

    async def serve_socket(self, sock: socket.socket, ctx: SessionContext, *,
                           banner_sent: bool = False) -> SessionResult:
        assert self._sock is not None
        # One small datagram with one descriptor: the C end reads them as they come.
        socket.send_fds(self._sock, [b"s"], [sock.fileno()])
        return SessionResult(None, 0, 0, "handed off")   # the node closes its copy

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


async def _main(args: argparse.Namespace, stop: asyncio.Event) -> None:
    try:
        home = NodeHome.load(args.home)
    except HomeError as exc:
        raise SystemExit(f"handoff node: {exc}")
    service = HandoffService(args.fdsock)
    try:
        await service.start()
    except OSError as exc:
        raise SystemExit(f"handoff node: cannot reach the C far end at {args.fdsock}: {exc}")
    node = Node(home, service, NodeSettings([parse_hostport(args.gateway)],
                                            pool_size=args.pool_size))
    node.start()
    try:
        await stop.wait()
    finally:
        await node.close()
        await service.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True)
    ap.add_argument("--gateway", required=True, metavar="HOST:PORT")
    ap.add_argument("--fdsock", required=True, metavar="PATH")
    ap.add_argument("--pool-size", type=int, default=DEFAULT_POOL_SIZE)
    args = ap.parse_args()
    setup_logging("info")
    run_until_signalled(lambda stop: _main(args, stop))


if __name__ == "__main__":
    main()
