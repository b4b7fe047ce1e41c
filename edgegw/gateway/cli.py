"""`edgegw serve`: the DMZ gateway."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from edgegw.cliparams import (IntRange, Seconds, congestion, hostport, metrics_options,
                              networks)
from edgegw.gateway.config import GatewayConfig
from edgegw.gateway.server import run_gateway
from edgegw.gateway.tls import TrustError, gateway_context
from edgegw.limits import raise_fd_limit
from edgegw.logsetup import LEVELS, setup_logging
from edgegw.metrics_http import MetricsEndpoint
from edgegw.netaddr import HostPort, Network
from edgegw.relay.base import DEFAULT_COALESCE_US, MAX_COALESCE_US
from edgegw.runner import run_until_signalled

MAX_SNDBUF = 64 << 20


@click.command()
@click.option("--external", required=True, callback=hostport, metavar="HOST:PORT",
              help="Where SFTP clients connect (e.g. 0.0.0.0:22).")
@click.option("--pnc", required=True, callback=hostport, metavar="HOST:PORT",
              help="Where internal nodes dial the control channel (TLS).")
@click.option("--data", required=True, callback=hostport, metavar="HOST:PORT",
              help="Where internal nodes dial one Data connection per session.")
@click.option("--trust", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PEM certificates of the nodes (or their CA): each node's gateway-trust.pem.")
@click.option("--gateway-id", default="gateway", show_default=True,
              help="Name of this gateway in logs and the nodes' audit trail.")
@click.option("--offer-timeout", default=2.0, show_default=True, type=Seconds(0.05),
              help="Seconds a node has to answer an offer before the next node gets it (the "
                   "client's last node, busy and answering no ping, gets until the grace "
                   "period ends).")
@click.option("--grace-period", default=10.0, show_default=True, type=Seconds(0),
              help="Seconds a client is held while no node is attached.")
@click.option("--heartbeat-interval", default=1.0, show_default=True, type=Seconds(0.05))
@click.option("--heartbeat-timeout", default=3.0, show_default=True, type=Seconds(0.1),
              help="A node silent this long is detached and gets no more offers.")
@click.option("--relay-backend", type=click.Choice(["splice", "select", "python"]), default=None,
              help="Relay engine backend (default: $EDGEGW_RELAY_BACKEND or splice on Linux).")
@click.option("--relay-threads", default=1, show_default=True, type=IntRange(1, 64))
@click.option("--relay-procs", default=0, show_default=True, type=IntRange(0, 64),
              help="Run the relay in this many child processes (each holds its own sessions' "
                   "descriptors; for more sessions than one process's open-files limit); "
                   "0: in the gateway process.")
@click.option("--pipe-size", default=1 << 20, show_default=True, type=IntRange(4096),
              help="Bytes per splice pipe (F_SETPIPE_SZ).")
@click.option("--idle-timeout", default=0.0, show_default=True, type=Seconds(0),
              help="Close a relayed session idle this many seconds (0: never).")
@click.option("--fin-timeout", default=30.0, show_default=True, type=Seconds(0),
              help="Close a relayed session this many seconds without a byte once one side has "
                   "closed (the node ended it, or the client): a client that never closes its "
                   "own side holds no descriptors past it. 0: only --idle-timeout applies.")
@click.option("--relay-coalesce-us", default=DEFAULT_COALESCE_US, show_default=True,
              type=IntRange(0, MAX_COALESCE_US),
              help="Microseconds a relay thread that just moved a little bulk (32 to 128 KiB "
                   "in one wakeup) lets data gather before it polls again: fewer wakeups per GB "
                   "where a fast sender's segments would each wake it, at the cost of a single "
                   "stream's speed and of the latency of sessions sharing the thread. Small "
                   "messages and larger batches never trigger it. 0: off.")
@click.option("--relay-sched", type=click.Choice(["batch", "normal"]), default="batch",
              show_default=True,
              help="Linux scheduling policy of the relay threads: batch (SCHED_BATCH) takes an "
                   "idle CPU at once but does not preempt a busy one on every wakeup; normal "
                   "preempts as any thread does.")
@click.option("--sndbuf-client", default=0, show_default=True, metavar="BYTES",
              type=IntRange(0, MAX_SNDBUF),
              help="Fixed send buffer of client connections (what downloads are written to); "
                   "0 keeps the kernel's autotuning. A small one cuts the relay's CPU per GB on "
                   "fast links, but caps each session at about BYTES / round-trip time.")
@click.option("--sndbuf-node", default=0, show_default=True, metavar="BYTES",
              type=IntRange(0, MAX_SNDBUF),
              help="The same for Data connections to nodes (what uploads are written to).")
@click.option("--congestion-client", default="auto", show_default=True, metavar="NAME",
              callback=congestion,
              help="TCP congestion control of client connections (e.g. cubic, bbr); kernel: "
                   "the kernel's default (net.ipv4.tcp_congestion_control). auto: cubic for "
                   "clients whose TCP handshake took under 1 ms (this host, its LAN or "
                   "datacenter), the kernel's default for the rest.")
@click.option("--congestion-node", default="auto", show_default=True, metavar="NAME",
              callback=congestion,
              help="The same for Data connections to nodes (what uploads are sent on). auto: "
                   "cubic where this process may set it, else the kernel's default. bbr paces "
                   "every burst with a timer unless the interface has the fq qdisc; on the "
                   "short hop to the nodes cubic does the same work for less CPU.")
@click.option("--max-waiting", default=1024, show_default=True, type=IntRange(1),
              help="Clients held at once while they wait for a node; more are closed.")
@click.option("--max-per-address", default=0, show_default=True, type=IntRange(0),
              help="Client connections held at once from one source address (waiting or "
                   "relayed); more are closed at once. 0: no limit.")
@click.option("--max-handshakes", default=256, show_default=True, type=IntRange(1),
              help="Connections not yet authenticated held at once on the PNC port, and on the "
                   "Data port; at this many that port takes no more until one ends (the next "
                   "wait in the kernel's backlog).")
@click.option("--max-handshakes-per-address", default=128, show_default=True,
              type=IntRange(0),
              help="Of those, how many one source address may hold on each port; more are "
                   "closed at once, so that one host cannot fill --max-handshakes and leave "
                   "the nodes waiting. Each node worker opens its whole --pool-size (32) of Data "
                   "connections at once: raise it for hosts with more than four workers "
                   "(--workers defaults to one per CPU). 0: no limit.")
@click.option("--proof-timeout", default=2.0, show_default=True, type=Seconds(0.1),
              help="Seconds a Data connection has to prove itself after the challenge (the "
                   "node answers at once: one round trip).")
@click.option("--proxy-protocol-from", multiple=True, metavar="CIDR", callback=networks,
              help="Accept PROXY protocol v1/v2 headers from these load balancers (repeatable).")
@metrics_options("sessions, bytes, nodes, refusals")
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
def serve(external: HostPort, pnc: HostPort, data: HostPort, trust: Path, gateway_id: str,
          offer_timeout: float, grace_period: float, heartbeat_interval: float,
          heartbeat_timeout: float, relay_backend: str | None, relay_threads: int,
          relay_procs: int, pipe_size: int, idle_timeout: float, fin_timeout: float,
          relay_coalesce_us: int,
          relay_sched: str, sndbuf_client: int, sndbuf_node: int, congestion_client: str,
          congestion_node: str, max_waiting: int, max_per_address: int, max_handshakes: int,
          max_handshakes_per_address: int, proof_timeout: float,
          proxy_protocol_from: tuple[Network, ...],
          metrics: MetricsEndpoint | None, log_level: str) -> None:
    """Run the gateway (DMZ): relay SFTP clients to internal nodes; holds no keys or files."""
    setup_logging(log_level)
    raise_fd_limit()  # two descriptors per relayed session
    try:
        gateway_context(trust)  # fail fast, before binding anything
    except TrustError as exc:
        raise click.ClickException(str(exc)) from None
    config = GatewayConfig(
        external=external, pnc=pnc, data=data, trust=trust, gateway_id=gateway_id,
        offer_timeout=offer_timeout, grace_period=grace_period,
        heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
        relay_backend=relay_backend, relay_threads=relay_threads, relay_procs=relay_procs,
        pipe_size=pipe_size, idle_timeout=idle_timeout, fin_timeout=fin_timeout,
        relay_coalesce_us=relay_coalesce_us,
        relay_sched_batch=relay_sched == "batch", sndbuf_client=sndbuf_client,
        sndbuf_node=sndbuf_node, congestion_client=congestion_client,
        congestion_node=congestion_node, max_pending=max_waiting,
        max_per_address=max_per_address, max_handshaking=max_handshakes,
        max_handshaking_per_address=max_handshakes_per_address, proof_timeout=proof_timeout,
        proxy_protocol_from=proxy_protocol_from,
        metrics=metrics)
    try:
        run_until_signalled(lambda stop: run_gateway(config, stop))
    except (OSError, ValueError) as exc:  # a port in use, a bad $EDGEGW_RELAY_BACKEND, ...
        logging.getLogger("edgegw.gateway").error("%s", exc)
        raise click.ClickException(str(exc)) from None
