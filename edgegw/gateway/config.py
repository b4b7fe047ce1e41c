"""Gateway settings: every knob `edgegw serve` exposes, with the defaults operators get."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgegw.metrics_http import MetricsEndpoint
from edgegw.netaddr import HostPort, Network
from edgegw.relay.base import DEFAULT_COALESCE_US
from edgegw.sockio import CC_AUTO


@dataclass(frozen=True)
class GatewayConfig:
    external: HostPort
    pnc: HostPort
    data: HostPort
    trust: Path
    gateway_id: str = "gateway"
    offer_timeout: float = 2.0        # node must answer an offer within this (but see
                                      # dispatch._await_answer: a busy last node)
    data_timeout: float = 5.0         # accepted offer must be proven on the Data port within this
    proof_timeout: float = 2.0        # a Data connection must send its proof within this; the
                                      # proof follows the challenge at once, so one round trip
    grace_period: float = 10.0        # hold clients this long while no node is attached
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0    # a ping unanswered this long: the node is dropped
    tls_handshake_timeout: float = 10.0
    relay_backend: str | None = None  # None: EDGEGW_RELAY_BACKEND or the platform default
    relay_threads: int = 1
    relay_procs: int = 0              # 0: the engine runs in the gateway process itself
    pipe_size: int = 1 << 20
    idle_timeout: float = 0.0         # 0: sessions may idle forever (SSH keepalives decide)
    fin_timeout: float = 30.0         # idle limit once one side closed; 0: idle_timeout only
    relay_coalesce_us: int = DEFAULT_COALESCE_US   # pause after a bulk wakeup; 0: never
    relay_sched_batch: bool = True    # relay threads SCHED_BATCH: their wakeups do not preempt
    sndbuf_client: int = 0            # SO_SNDBUF towards clients (downloads); 0: autotuned
    sndbuf_node: int = 0              # SO_SNDBUF of Data connections (uploads); 0: autotuned
    congestion_client: str = CC_AUTO  # TCP_CONGESTION towards clients; "": the kernel's default
    congestion_node: str = CC_AUTO    # of Data connections; sockio.resolve_congestion
    max_pending: int = 1024           # clients waiting for a node at once; more are closed
    max_per_address: int = 0          # client connections held at once per source address; 0: any
    max_handshaking: int = 256        # unauthenticated PNC or Data connections at once, each;
                                      # at the cap that listener pauses accepting
    max_handshaking_per_address: int = 128   # of those, per port from one source address; more
                                      # are closed at accept. 0: any. A node worker's pool fill
                                      # dials pool_size (32) at once: room for four workers
    proxy_protocol_from: tuple[Network, ...] = field(
        default_factory=tuple)
    metrics: MetricsEndpoint | None = None   # where Prometheus scrapes; None: not served
    backlog: int = 1024
