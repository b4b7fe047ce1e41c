"""What a node service is told about a session, and what it reports when the session ends."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SessionContext:
    session_id: str      # 16 hex digits (the PNC session id), or a local one for direct clients
    client_ip: str       # the REAL client address (from the gateway's offer)
    client_port: int
    gateway: str         # gateway id; "" for direct (--listen) clients


@dataclass(frozen=True)
class SessionResult:
    username: str | None
    bytes_in: int        # client -> node
    bytes_out: int       # node -> client
    reason: str


class SessionService(Protocol):
    """What the node runs each accepted Data connection through (SSH server or forwarder)."""

    @property
    def active(self) -> int: ...

    async def start(self) -> None:
        """Load what admit() decides from, before the first client arrives."""

    def admit(self, client_ip: str) -> str | None:
        """Layer-7 decision at offer time, fast: a reason to reject, or None to accept."""

    @property
    def banner(self) -> bytes:
        """What every connection of this service starts with, so the node may send it with
        its answer to the gateway (see Node._assigned); b"" when that is not known up front."""

    async def serve_socket(self, sock: socket.socket, ctx: SessionContext, *,
                           banner_sent: bool = False) -> SessionResult:
        """Serve one connection; `banner_sent`: `banner` was written on it already."""

    async def close(self) -> None: ...
