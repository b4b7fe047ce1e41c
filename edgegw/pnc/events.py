"""PNC events: the messages gateway and node exchange on the control channel.

Frozen dataclasses, one per message type. The wire codec lives in `framing.py`/`codec.py`;
which side may send what, and when, lives in `state.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = 2


@dataclass(frozen=True, slots=True)
class GatewayHello:
    """First message from the gateway. Tells the node where to dial Data connections."""

    version: int
    gateway_id: str          # operator-chosen name, for logs and the audit trail
    data_port: int           # the gateway's Data port (host is the one the node dialed)
    heartbeat_interval_ms: int
    pool_key: bytes          # 32 random bytes: proves pooled (pre-opened) Data connections


@dataclass(frozen=True, slots=True)
class NodeHello:
    """First message from the node."""

    version: int
    node_id: str
    capacity: int            # sessions the node accepts at most (0 = unlimited)
    weight: int              # relative share of new sessions (1..1000)
    active: int              # sessions running now
    draining: bool


@dataclass(frozen=True, slots=True)
class Offer:
    """Gateway -> node: a client is waiting; here is what the node needs to decide and prove."""

    session_id: int          # unsigned 64-bit, random, non-zero
    secret: bytes            # 32 bytes, single use; keys the Data-connection proof
    client_ip: str           # real client address (IPv4 or IPv6 text form)
    client_port: int
    expires_ms: int          # the offer lapses this many milliseconds after it was sent


@dataclass(frozen=True, slots=True)
class Accept:
    """Node -> gateway: the node takes the offered session and is dialing its Data connection."""

    session_id: int


@dataclass(frozen=True, slots=True)
class Reject:
    session_id: int
    reason: str              # short, human-readable ("banned", "capacity", "no user from ip")
    retry_elsewhere: bool = False  # True: another node may take it (capacity, draining)


@dataclass(frozen=True, slots=True)
class Closed:
    """Gateway -> node: the relayed session ended; joins the gateway's view to the audit trail."""

    session_id: int
    bytes_up: int            # client -> node
    bytes_down: int          # node -> client
    duration_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class Load:
    """Node -> gateway: current load, sent on change and with heartbeats."""

    active: int
    capacity: int
    weight: int
    draining: bool


@dataclass(frozen=True, slots=True)
class Ping:
    """Sent by both ends every heartbeat interval; the other end must answer it."""
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Answers the Ping with this `seq` and every one before it (edgegw.pnc.liveness)."""
    seq: int


@dataclass(frozen=True, slots=True)
class Ban:
    """Node -> gateway: drop connections from this address at accept time until `until`."""

    ip: str                  # an address or a CIDR
    until: float             # unix time, seconds
    reason: str


@dataclass(frozen=True, slots=True)
class Unban:
    ip: str


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Either side: closing on purpose (shutdown, drain finished, protocol error)."""

    reason: str


Event = (
    GatewayHello | NodeHello | Offer | Accept | Reject | Closed | Load | Ping | Pong | Ban
    | Unban | Goodbye
)
