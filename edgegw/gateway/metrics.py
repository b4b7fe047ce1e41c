"""What the gateway exposes at `--metrics`: read from its live state at each scrape.

Nothing here runs per packet: sessions and refusals add an integer increment each, and the
relay's byte and buffer figures are the engine's own counters, kept whether or not anyone
scrapes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from edgegw.relay import FinishReason, RelayReport

if TYPE_CHECKING:
    from edgegw.gateway.server import Gateway

# why a client was closed before it reached a node (the `reason` label); proxy_header: no
# valid PROXY header from a --proxy-protocol-from balancer; relay_error: a node took it but
# the relay engine could not (out of memory or descriptors, a relay process gone)
REFUSED_REASONS = ("banned", "address_limit", "waiting_limit", "no_node", "rejected",
                   "proxy_header", "relay_error")
# listeners whose unauthenticated connections are capped per source address
HANDSHAKE_LISTENERS = ("pnc", "data")


@dataclass
class GatewayCounters:
    """Totals the gateway keeps for its metrics (events, not state)."""

    finished: Counter[str] = field(default_factory=Counter)    # by FinishReason value
    upload_bytes: int = 0          # client -> node, of finished sessions
    download_bytes: int = 0
    refused: Counter[str] = field(default_factory=Counter)     # by REFUSED_REASONS
    # PNC/Data connections closed at accept by --max-handshakes-per-address, by listener
    handshakes_refused: Counter[str] = field(default_factory=Counter)
    pooled_refused: int = 0        # proven Data connections closed: their node's pool was full
    client_congestion: Counter[str] = field(default_factory=Counter)   # past the checks, by it

    def session_finished(self, report: RelayReport) -> None:
        self.finished[report.reason.value] += 1
        self.upload_bytes += report.bytes_a_to_b
        self.download_bytes += report.bytes_b_to_a


class GatewayCollector(Collector):
    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw

    def collect(self) -> Iterator[object]:
        gw = self.gw
        counters = gw.counters
        st = gw.relay.stats()
        yield InfoMetricFamily("edgegw_gateway", "This gateway.", value={
            "gateway_id": gw.config.gateway_id, "version": _version(),
            "relay_backend": st.backend, "relay_procs": str(gw.config.relay_procs)})

        yield GaugeMetricFamily("edgegw_gateway_sessions_active",
                                "Sessions the relay is moving bytes for.",
                                value=st.active_sessions)
        yield CounterMetricFamily("edgegw_gateway_sessions",
                                  "Sessions handed to the relay.", value=st.total_sessions)
        finished = CounterMetricFamily("edgegw_gateway_sessions_finished",
                                       "Relayed sessions that ended, by why.", labels=["reason"])
        for reason in FinishReason:
            finished.add_metric([reason.value], counters.finished[reason.value])
        yield finished
        yield CounterMetricFamily("edgegw_gateway_relayed_bytes",
                                  "Bytes the relay moved, both ways, running sessions included "
                                  "(with --relay-procs, up to a second late).",
                                  value=st.bytes_total)
        done = CounterMetricFamily("edgegw_gateway_finished_session_bytes",
                                   "Bytes of finished sessions, by direction.",
                                   labels=["direction"])
        done.add_metric(["upload"], counters.upload_bytes)
        done.add_metric(["download"], counters.download_bytes)
        yield done
        buffers = GaugeMetricFamily("edgegw_gateway_relay_buffers",
                                    "Splice pipes (or select buffers) held by sessions with "
                                    "bytes in flight, and kept pooled for reuse.",
                                    labels=["state"])
        buffers.add_metric(["in_use"], st.pipes_in_use + st.buffers_in_use)
        buffers.add_metric(["pooled"], st.pipes_pooled + st.buffers_pooled)
        yield buffers

        yield GaugeMetricFamily("edgegw_gateway_clients_waiting",
                                "Clients accepted and waiting for a node.",
                                value=gw.pending_clients)
        refused = CounterMetricFamily("edgegw_gateway_clients_refused",
                                      "Clients closed before they reached a node, by why.",
                                      labels=["reason"])
        for why in REFUSED_REASONS:
            refused.add_metric([why], counters.refused[why])
        yield refused
        client_cc = CounterMetricFamily(
            "edgegw_gateway_client_connections",
            "Client connections past the bans and limits, by the TCP congestion control "
            "they run (--congestion-client auto chooses by the handshake's round trip).",
            labels=["congestion"])
        for name, n in sorted(counters.client_congestion.items()):
            client_cc.add_metric([name], n)
        yield client_cc
        handshakes = GaugeMetricFamily("edgegw_gateway_handshakes",
                                       "PNC and Data connections not yet authenticated.",
                                       labels=["listener"])
        for name, n in gw.handshaking.items():
            handshakes.add_metric([name], n)
        yield handshakes
        hs_refused = CounterMetricFamily(
            "edgegw_gateway_handshakes_refused",
            "PNC and Data connections closed at accept, by listener and why "
            "(address_limit: --max-handshakes-per-address).", labels=["listener", "reason"])
        for name in HANDSHAKE_LISTENERS:
            hs_refused.add_metric([name, "address_limit"], counters.handshakes_refused[name])
        yield hs_refused
        yield CounterMetricFamily(
            "edgegw_gateway_pooled_data_refused",
            "Pre-opened Data connections closed once proven because their node already held "
            "as many as the gateway keeps for one node.", value=counters.pooled_refused)
        yield GaugeMetricFamily("edgegw_gateway_bans", "Addresses banned now.",
                                value=len(gw.bans))

        peers = gw.peers.peers
        yield GaugeMetricFamily("edgegw_gateway_nodes", "Nodes attached over the PNC.",
                                value=len(peers))
        per_node = {
            "sessions": GaugeMetricFamily("edgegw_gateway_node_sessions",
                                          "Sessions a node reports running.", labels=["node"]),
            "capacity": GaugeMetricFamily("edgegw_gateway_node_capacity",
                                          "A node's session capacity (0: unlimited).",
                                          labels=["node"]),
            "pooled": GaugeMetricFamily("edgegw_gateway_node_pooled_data",
                                        "Pre-opened Data connections held for a node.",
                                        labels=["node"]),
            "draining": GaugeMetricFamily("edgegw_gateway_node_draining",
                                          "1 while a node takes no new sessions.",
                                          labels=["node"]),
        }
        for peer in peers:
            per_node["sessions"].add_metric([peer.node_id], peer.active)
            per_node["capacity"].add_metric([peer.node_id], peer.capacity)
            per_node["pooled"].add_metric([peer.node_id], len(peer.pool))
            per_node["draining"].add_metric([peer.node_id], int(peer.draining))
        yield from per_node.values()


def _version() -> str:
    try:
        return metadata.version("edgegw")
    except metadata.PackageNotFoundError:   # run from a source tree
        return "unknown"
