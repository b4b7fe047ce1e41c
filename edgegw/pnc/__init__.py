"""The PNC (Peer Notification Channel): the control protocol between gateway and node, sans-IO.

`Connection(role)` turns received bytes into events and events into bytes, with no sockets in
it; the asyncio drivers in `edgegw.gateway` and `internal` move the bytes. `dataauth` holds the
fixed-size handshake that proves a Data connection.
"""
from __future__ import annotations

from edgegw.pnc import dataauth
from edgegw.pnc.codec import KEY_LEN, MAX_IP_TEXT, MAX_TEXT
from edgegw.pnc.connection import Connection
from edgegw.pnc.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from edgegw.pnc.events import (
    PROTOCOL_VERSION, Accept, Ban, Closed, Event, GatewayHello, Goodbye, Load, NodeHello, Offer,
    Ping, Pong, Reject, Unban,
)
from edgegw.pnc.framing import MAX_BODY
from edgegw.pnc.state import Role, State

__all__ = [
    "Accept", "Ban", "Closed", "Connection", "Event", "GatewayHello", "Goodbye", "KEY_LEN",
    "Load", "LocalProtocolError", "MAX_BODY", "MAX_IP_TEXT", "MAX_TEXT", "NodeHello", "Offer",
    "PROTOCOL_VERSION", "Ping", "Pong", "ProtocolError", "Reject", "RemoteProtocolError", "Role",
    "State", "Unban", "dataauth",
]
