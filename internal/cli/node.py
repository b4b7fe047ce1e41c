"""`edgegw internal init|serve|drain`."""
from __future__ import annotations

import os
import signal
import time

import click

from edgegw import eventloop
from edgegw.cliparams import IntRange, Seconds, congestion, hostport, metrics_options
from edgegw.limits import raise_fd_limit
from edgegw.logsetup import LEVELS, setup_logging
from edgegw.metrics_http import MetricsEndpoint
from edgegw.netaddr import HostPort
from internal.cli.common import default_workers, home_option, load_home
from internal.data_pool import DEFAULT_SIZE as DEFAULT_POOL_SIZE
from internal.home import HomeError, NodeHome
from internal.sftp.uploads import PARTIAL_SUFFIXES
from internal.ssh.revocation import DEFAULT_INTERVAL as RECHECK_INTERVAL
from internal.store.base import StoreError


@click.command()
@home_option
@click.option("--db", "db_url", default=None, metavar="URL",
              help="Store URL: postgresql://user@host/db for several nodes "
                   "(default: SQLite in the home).")
@click.option("--node-id", default=None, help="Name of this node in logs and the audit trail.")
@click.option("--files-root", default=None, type=click.Path(file_okay=False),
              help="Where user home directories go (default: HOME/files; share it between "
                   "nodes that serve the same users).")
@click.option("--ca", "ca_dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="Sign the PNC certificate with the CA in this directory (from `edgegw "
                   "internal ca create`); gateways then trust the CA for every node.")
def init(home_dir: str, db_url: str | None, node_id: str | None, files_root: str | None,
         ca_dir: str | None) -> None:
    """Create a node home: SSH host keys, PNC certificate, store, gateway-trust.pem."""
    from internal.store import open_store

    def check_store(url: str) -> None:
        open_store(url).close()  # creates the schema now, so errors show here, not later

    try:   # a store that cannot be opened fails the init and leaves no half-built home
        home = NodeHome.init(home_dir, db_url=db_url, node_id=node_id, files_root=files_root,
                             ca_dir=ca_dir, check_store=check_store)
    except (HomeError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
    from internal.store.sql import _redact
    # stdout ends up in provisioning logs: no password from the URL
    click.echo(f"initialised {home.path} (node {home.node_id}, store {_redact(home.db_url)})")
    click.echo(f"copy {home.trust_file} to the gateway and pass it as --trust")


@click.command()
@home_option
@click.option("--gateway", "gateways", multiple=True, callback=hostport, metavar="HOST:PORT",
              help="A gateway's PNC address to dial (repeatable: serve several gateways).")
@click.option("--listen", callback=hostport, default=None, metavar="HOST:PORT",
              help="Also serve SSH/SFTP directly on the trusted network (off by default).")
@click.option("--forward", callback=hostport, default=None, metavar="HOST:PORT",
              help="Relay sessions to this TCP service instead of the built-in SFTP server.")
@click.option("--forward-proxy-protocol", type=click.Choice(["v1", "v2"]), default=None,
              help="With --forward: prepend a PROXY header carrying the real client address.")
@click.option("--capacity", default=0, show_default=True, type=IntRange(0),
              help="Most sessions this node runs at once (0: unlimited).")
@click.option("--weight", default=100, show_default=True, type=IntRange(1, 1000),
              help="Relative share of new sessions among nodes.")
@click.option("--drain-timeout", default=60.0, show_default=True, type=Seconds(0),
              help="On SIGTERM/drain: seconds to let running sessions finish.")
@click.option("--node-id", default=None, help="Override the home's node id.")
@click.option("--workers", default=0, type=IntRange(0, 256),
              help="Node processes to run [default: 0 = one per CPU]; each attaches to every "
                   "gateway as its own peer (node id suffixed -wN), so SFTP work spreads over "
                   "the cores.")
@click.option("--pool-size", default=DEFAULT_POOL_SIZE, show_default=True,
              type=IntRange(0, 256),
              help="Pre-opened Data connections per gateway (0: dial one per session).")
@click.option("--congestion-gateway", default="auto", show_default=True, metavar="NAME",
              callback=congestion,
              help="TCP congestion control of the Data connections to the gateways (what "
                   "downloads are sent on), e.g. cubic; kernel: the kernel's default; auto: "
                   "cubic where this process may set it, else the kernel's. See the "
                   "gateway's --congestion-node.")
@click.option("--congestion-client", default="auto", show_default=True, metavar="NAME",
              callback=congestion,
              help="TCP congestion control of clients served directly (--listen); auto: cubic "
                   "for clients whose TCP handshake took under 1 ms, the kernel's default for "
                   "the rest, as the gateway's --congestion-client.")
@click.option("--recheck-interval", default=RECHECK_INTERVAL, show_default=True,
              type=Seconds(0.1),
              help="Seconds between two checks of running SFTP sessions against the store: a "
                   "session whose user was removed, disabled or expired, whose address rules "
                   "no longer allow its client address, or whose address is banned, is ended; "
                   "a change of permissions, root or quota applies to its next operations.")
@click.option("--partial-suffix", "partial_suffixes", multiple=True,
              default=tuple(map(os.fsdecode, PARTIAL_SUFFIXES)), show_default=True,
              metavar="SUFFIX",
              help="Uploads to names ending in SUFFIX are clients' own temporaries (WinSCP "
                   "uploads to NAME.filepart, then renames it): written in place, not "
                   "published whole at close, so a cut-off upload stays to be resumed. "
                   "Repeatable; '' for none.")
@metrics_options("logins, sessions, bytes, attached gateways; with --workers, their sum")
@click.option("--reuse-port", is_flag=True, hidden=True,
              help="Share --listen with sibling worker processes (set by --workers).")
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
def serve(home_dir: str, gateways: list[HostPort], listen: HostPort | None,
          forward: HostPort | None, forward_proxy_protocol: str | None, capacity: int,
          weight: int, drain_timeout: float, node_id: str | None, workers: int,
          pool_size: int, congestion_gateway: str, congestion_client: str,
          recheck_interval: float,
          partial_suffixes: tuple[str, ...], metrics: MetricsEndpoint | None, reuse_port: bool,
          log_level: str) -> None:
    """Run the internal node: dial the gateways and serve the sessions they offer."""
    from internal.runtime import ServeOptions, serve as run_node

    setup_logging(log_level)
    raise_fd_limit()  # a descriptor per session (two in --forward mode), plus open files
    home = load_home(home_dir)
    workers = workers or default_workers()
    if not gateways and listen is None:
        raise click.UsageError("give at least one --gateway HOST:PORT (or --listen)")
    if listen is not None and forward is not None:
        raise click.UsageError("--listen and --forward cannot be combined")
    if forward_proxy_protocol and forward is None:
        raise click.UsageError("--forward-proxy-protocol needs --forward")
    try:  # a broken home fails here, once, rather than in every worker
        home.check_tls()
        if forward is None:
            home.host_keys()
    except HomeError as exc:
        raise click.ClickException(str(exc)) from None
    if workers > 1:
        import sys

        from internal.runtime import run_dir
        from internal.workers import WorkersFailed, supervise
        try:
            code = supervise(sys.argv[1:], workers, node_id or home.node_id, run_dir(home),
                             metrics)
        except (OSError, WorkersFailed) as exc:   # OSError: the metrics address is taken
            raise click.ClickException(str(exc)) from None
        raise SystemExit(code)
    from internal.workers import follow_supervisor
    follow_supervisor()     # a worker: stop when its supervisor does
    opts = ServeOptions(list(gateways), listen=listen, forward=forward,
                        forward_proxy_protocol=forward_proxy_protocol, capacity=capacity,
                        weight=weight, drain_timeout=drain_timeout, node_id=node_id,
                        pool_size=pool_size, reuse_port=reuse_port,
                        data_congestion=congestion_gateway,
                        client_congestion=congestion_client, metrics=metrics,
                        recheck_interval=recheck_interval,
                        partial_suffixes=tuple(os.fsencode(x) for x in partial_suffixes if x))
    try:
        eventloop.run(run_node(home, opts))
    except (HomeError, StoreError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


@click.command()
@home_option
@click.option("--timeout", default=120.0, show_default=True, type=Seconds(0),
              help="Seconds to wait for the node processes to finish and exit.")
def drain(home_dir: str, timeout: float) -> None:
    """Drain the nodes running on this home: no new sessions, let running ones end, exit."""
    from internal.runtime import live_pid, pid_files

    home = load_home(home_dir)
    pids: list[int] = []
    for path in pid_files(home):
        try:
            pid = live_pid(path)    # None: a crashed node's file, whose pid may be reused
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise click.ClickException(f"not allowed to signal node process in {path}") from None
    if not pids:
        raise click.ClickException(f"no node is running on {home.path}")
    click.echo(f"draining {len(pids)} node process(es): {', '.join(map(str, pids))}")
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    if pids:
        raise click.ClickException(f"still running after {timeout:.0f}s: {pids}")
    click.echo("drained")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


@click.group()
def ca() -> None:
    """An operator CA that signs node certificates (one trust file for all nodes)."""


@ca.command("create")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="Where to write ca.key (keep it offline) and ca.crt.")
def ca_create(directory: str) -> None:
    """Create ca.key and ca.crt; then `edgegw internal init --ca DIR` for each node."""
    from pathlib import Path

    from internal.home import make_ca
    try:
        crt = make_ca(Path(directory))
    except HomeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"CA written; give gateways {crt} as --trust")

