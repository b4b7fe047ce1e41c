"""A single-hop TCP relay on edgegw's relay engine, for an apples-to-apples comparison with
HAProxy and socat (the gateway path adds a second hop: the node).

    python -m bench.engine_relay LISTEN_PORT TARGET_PORT [--backend splice|select|python]

Accepts on 127.0.0.1:LISTEN_PORT, dials 127.0.0.1:TARGET_PORT for each client and hands both
sockets to `edgegw.relay.create_relay()`; it prints "ready" once listening.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import socket

from edgegw.relay.base import DEFAULT_COALESCE_US


async def main(listen: int, target: int, backend: str | None, threads: int,
               pipe_size: int, coalesce_us: int, sched_batch: bool) -> None:
    from edgegw.relay import create_relay

    relay = create_relay(backend, threads=threads, pipe_size=pipe_size, coalesce_us=coalesce_us,
                         sched_batch=sched_batch)
    relay.start(lambda report: None)
    loop = asyncio.get_running_loop()
    ids = itertools.count(1)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", listen))
    lsock.listen(4096)
    lsock.setblocking(False)

    async def pair(client: socket.socket) -> None:
        up = socket.socket()
        up.setblocking(False)
        try:
            await loop.sock_connect(up, ("127.0.0.1", target))
        except OSError:
            client.close()
            up.close()
            return
        for s in (client, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        relay.add(next(ids), client, up)

    async def accept_loop() -> None:
        while True:
            client, _ = await loop.sock_accept(lsock)
            client.setblocking(False)
            loop.create_task(pair(client))

    task = loop.create_task(accept_loop())
    print(f"ready backend={relay.backend}", flush=True)
    await stop.wait()
    task.cancel()
    lsock.close()
    await relay.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("listen", type=int)
    ap.add_argument("target", type=int)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pipe-size", type=int, default=1 << 20)
    ap.add_argument("--coalesce-us", type=int, default=DEFAULT_COALESCE_US)
    ap.add_argument("--normal-sched", action="store_true", help="relay threads not SCHED_BATCH")
    a = ap.parse_args()
    asyncio.run(main(a.listen, a.target, a.backend, a.threads, a.pipe_size, a.coalesce_us,
                     not a.normal_sched))
