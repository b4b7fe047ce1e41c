"""Assemble and run a node process: store, audit, defender, service, links, signals, pid file."""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from edgegw.metrics_http import MetricsEndpoint
from edgegw.netaddr import HostPort
from edgegw.sockio import CC_AUTO, resolve_client_congestion, resolve_congestion
from internal.audit import AuditLog
from internal.data_pool import DEFAULT_SIZE as DEFAULT_POOL_SIZE
from internal.defender import Defender
from internal.forward import ForwardService
from internal.home import NodeHome
from internal.node import Node, NodeSettings
from internal.session import SessionService
from internal.sftp.uploads import PARTIAL_SUFFIXES
from internal.ssh.revocation import DEFAULT_INTERVAL as RECHECK_INTERVAL
from internal.store import open_store
from internal.store.calls import store_call

log = logging.getLogger("edgegw.node")

BAN_SYNC_INTERVAL = 1.0


@dataclass
class ServeOptions:
    gateways: list[HostPort]
    listen: HostPort | None = None
    forward: HostPort | None = None
    forward_proxy_protocol: str | None = None
    capacity: int = 0
    weight: int = 100
    drain_timeout: float = 60.0
    node_id: str | None = None
    pool_size: int = DEFAULT_POOL_SIZE
    reuse_port: bool = False
    data_congestion: str = CC_AUTO   # sockio.resolve_congestion
    client_congestion: str = CC_AUTO   # of direct (--listen) clients; resolve_client_congestion
    metrics: MetricsEndpoint | None = None   # serve Prometheus metrics (one process: its own)
    recheck_interval: float = RECHECK_INTERVAL   # seconds; internal.ssh.revocation
    # names that are clients' own temporaries, written in place (Upload.start_in_place)
    partial_suffixes: tuple[bytes, ...] = PARTIAL_SUFFIXES


def run_dir(home: NodeHome) -> Path:
    return home.path / "run"


def pid_files(home: NodeHome) -> list[Path]:
    return sorted(run_dir(home).glob("node-*.pid"))


def write_pid_file(path: Path) -> int:
    """Write this process's pid file and hold a lock on it until the process ends (the
    returned descriptor stays open): a file nobody holds is a crashed node's, whose pid may
    belong to another program by now (live_pid)."""
    temp = path.with_name(f".{path.name}.new")   # locked before it has its name: a
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:                                        # sibling's check never sees it unlocked
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.replace(temp, path)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    return fd


def live_pid(path: Path) -> int | None:
    """The pid in a node's pid file while that node runs; None, and the file removed, when
    it is a leftover (its node was killed, or the host crashed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:     # held: its node is running
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        path.unlink(missing_ok=True)
        return None
    finally:
        os.close(fd)


async def serve(home: NodeHome, opts: ServeOptions) -> None:
    store = await asyncio.to_thread(open_store, home.db_url)
    node_id = opts.node_id or home.node_id
    audit = AuditLog(store, node_id)
    defender = Defender(store)
    data_cc, data_cc_said = resolve_congestion(opts.data_congestion)
    service: SessionService
    # Both services check bans against the node's memory (Node.banned): no store query per
    # client, and the same view the node pushes to its gateways.
    if opts.forward is not None:
        service = ForwardService(opts.forward, proxy_protocol=opts.forward_proxy_protocol,
                                 capacity=opts.capacity, banned=lambda ip: node.banned(ip),
                                 audit=audit, recheck_interval=opts.recheck_interval)
    else:
        from internal.ssh.service import SSHService
        service = SSHService(home, store, audit, defender, capacity=opts.capacity,
                             banned=lambda ip: node.banned(ip),
                             recheck_interval=opts.recheck_interval,
                             partial_suffixes=opts.partial_suffixes)
    node = Node(home, service, NodeSettings(opts.gateways, capacity=opts.capacity,
                                            weight=opts.weight, drain_timeout=opts.drain_timeout,
                                            node_id=node_id, pool_size=opts.pool_size,
                                            data_congestion=data_cc),
                audit=audit)
    listener = None
    pid_file = run_dir(home) / f"node-{os.getpid()}.pid"
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    drain = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, drain.set)  # SIGTERM drains, as orchestrators expect
    ban_task = None
    pid_fd = -1
    metrics = None
    try:
        if opts.metrics is not None:
            from prometheus_client import REGISTRY

            from edgegw.metrics_http import MetricsServer
            metrics = MetricsServer(opts.metrics, REGISTRY)
            await metrics.start()
        await service.start()
        if opts.listen is not None:  # the CLI refuses --listen with --forward
            # the node admits and counts direct clients too: drain, capacity and load see them
            client_cc = resolve_client_congestion(opts.client_congestion)
            listener = await service.listen(opts.listen.host, opts.listen.port,  # type: ignore[union-attr]
                                            reuse_port=opts.reuse_port,
                                            on_client=node.serve_direct, congestion=client_cc)
            log.info("serving SSH/SFTP directly on %s (TCP congestion control: %s)",
                     opts.listen, client_cc.said)
        run_dir(home).mkdir(exist_ok=True)
        for leftover in pid_files(home):
            live_pid(leftover)              # removes those of nodes that did not stop cleanly
        pid_fd = write_pid_file(pid_file)
        pushed: dict[str, float] = {}
        try:  # admission knows the bans before the first client
            await _sync_bans(node, defender, pushed)
        except Exception:
            log.exception("could not read bans from the store (retrying every %.0fs)",
                          BAN_SYNC_INTERVAL)
        node.start()
        ban_task = asyncio.create_task(_ban_sync_loop(node, defender, pushed))
        log.info("node %s started (%s), gateways: %s", node_id,
                 f"forward to {opts.forward}" if opts.forward else "SSH/SFTP",
                 ", ".join(map(str, opts.gateways)) or "none")
        log.info("Data connections: TCP congestion control %s", data_cc_said)
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(drain.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if drain.is_set() and not stop.is_set():
            if listener is not None:   # new direct clients are refused, not accepted then cut
                listener.close()
            drain_task = asyncio.create_task(node.drain())
            stop_task = asyncio.create_task(stop.wait())
            await asyncio.wait([drain_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
            drain_task.cancel()
            stop_task.cancel()
    finally:
        if metrics is not None:
            await metrics.close()
        if ban_task is not None:
            ban_task.cancel()
        if listener is not None:
            listener.close()
        await node.close()
        await asyncio.to_thread(audit.close)
        await asyncio.to_thread(store.close)
        pid_file.unlink(missing_ok=True)
        if pid_fd >= 0:
            os.close(pid_fd)
        log.info("node %s stopped", node_id)


async def _sync_bans(node: Node, defender: Defender, pushed: dict[str, float]) -> None:
    """Push every active ban (from this node's defender, another node or the operator) to the
    gateways, and lift the ones that were removed. Polling the store makes PostgreSQL-shared
    bans and `edgegw internal ban` changes reach every gateway without extra plumbing."""
    current = {b.ip: b for b in await store_call(defender.active_bans)}
    for ip, entry in current.items():
        if pushed.get(ip) != entry.until:
            node.push_ban(entry)
            pushed[ip] = entry.until
    for ip in list(pushed):
        if ip not in current:
            node.push_unban(ip)
            del pushed[ip]


async def _ban_sync_loop(node: Node, defender: Defender, pushed: dict[str, float]) -> None:
    while True:
        await asyncio.sleep(BAN_SYNC_INTERVAL)
        try:
            await _sync_bans(node, defender, pushed)
        except Exception:  # store hiccup: keep what we have, try again
            log.exception("could not read bans from the store")
