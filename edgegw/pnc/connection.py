"""The PNC connection object: bytes in, events out; events in, bytes out. No I/O.

The same object serves the gateway and the node (pick the `Role`), runs under asyncio, in tests
and under a fuzzer. It checks framing, field validity and the state table, and nothing that
needs a clock: offers, timeouts and heartbeats belong to the drivers.
"""
from __future__ import annotations

from edgegw.pnc import codec
from edgegw.pnc.errors import LocalProtocolError, RemoteProtocolError
from edgegw.pnc.events import PROTOCOL_VERSION, Event, GatewayHello, Goodbye, NodeHello
from edgegw.pnc.framing import FrameReader, encode_frame
from edgegw.pnc.state import HELLO, Role, State, explain, next_state, settle


class Connection:
    """One end of a PNC channel, as `role`.

    `receive_data` returns the complete events in what it was given (keeping any partial frame
    for the next call). If the data breaks the protocol it raises RemoteProtocolError instead,
    drops the events of that call (the peer is no longer trusted), and raises the same error on
    every later call: the driver should log it, optionally `send(Goodbye(...))`, and close.
    """

    __slots__ = ("role", "_ours", "_theirs", "_frames", "_error", "_peer_hello", "_their_version")

    def __init__(self, role: Role) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be a Role, got {role!r}")
        self.role = role
        self._ours = State.IDLE
        self._theirs = State.IDLE
        self._frames = FrameReader(codec.TYPE_LIMITS)
        self._error: RemoteProtocolError | None = None
        self._peer_hello: GatewayHello | NodeHello | None = None
        self._their_version: int | None = None

    def __repr__(self) -> str:
        return (f"<pnc.Connection {self.role.value} ours={self._ours.value} "
                f"theirs={self._theirs.value}{' ERROR' if self._error else ''}>")

    @property
    def our_state(self) -> State:
        """State of what we send."""
        return self._ours

    @property
    def their_state(self) -> State:
        """State of what the peer sends."""
        return self._theirs

    @property
    def state(self) -> State:
        """The whole connection in one word: ERROR, CLOSED (either Goodbye), OPEN, or the
        handshake step of our side (IDLE before our hello, HELLO_SENT while we wait for theirs)."""
        if self._error is not None:
            return State.ERROR
        if State.CLOSED in (self._ours, self._theirs):
            return State.CLOSED
        if self._ours is State.OPEN and self._theirs is State.OPEN:
            return State.OPEN
        return self._ours

    @property
    def peer_hello(self) -> GatewayHello | NodeHello | None:
        """The hello the peer sent, once it has arrived."""
        return self._peer_hello

    @property
    def their_version(self) -> int | None:
        """The protocol version the peer claimed, even when it did not match ours."""
        return self._their_version

    @property
    def error(self) -> RemoteProtocolError | None:
        """The error that killed the receive side, if any."""
        return self._error

    def send(self, event: Event) -> bytes:
        """The bytes for `event`; LocalProtocolError (nothing changes) if it may not be sent."""
        event_type = type(event)
        if self._error is not None and event_type is not Goodbye:
            raise LocalProtocolError(
                f"the connection is dead ({self._error}); only Goodbye may still be sent")
        new = next_state(self.role, self._ours, event_type)
        if new is None:
            raise LocalProtocolError(explain(self.role, self._ours, event_type))
        if event_type is HELLO[self.role] and event.version != PROTOCOL_VERSION:  # type: ignore[union-attr]
            raise LocalProtocolError(
                f"this code speaks PNC version {PROTOCOL_VERSION}; refusing to send a hello "
                f"claiming version {event.version}")  # type: ignore[union-attr]
        frame_type, body = codec.encode(event)
        data = encode_frame(frame_type, body)
        self._ours = settle(new, self._theirs)
        self._theirs = settle(self._theirs, self._ours)
        return data

    def receive_data(self, data: bytes) -> list[Event]:
        """Events completed by `data`; RemoteProtocolError if the peer broke the protocol."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        if not data:
            return []
        try:
            if self._theirs is State.CLOSED:
                raise RemoteProtocolError(f"the {self.role.peer.value} sent data after its Goodbye")
            events = [self._receive(t, body) for t, body in self._frames.feed(data)]
            if self._theirs is State.CLOSED and self._frames.buffered:
                raise RemoteProtocolError(f"the {self.role.peer.value} sent data after its Goodbye")
            return events
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _receive(self, frame_type: int, body: bytes) -> Event:
        peer = self.role.peer
        event_type = codec.CLASS_OF[frame_type]  # FrameReader admits known types only
        new = next_state(peer, self._theirs, event_type)
        if new is None:
            raise RemoteProtocolError(explain(peer, self._theirs, event_type))
        if frame_type in codec.HELLO_TYPES:
            version = codec.hello_version(body)
            self._their_version = version
            if version != PROTOCOL_VERSION:
                raise RemoteProtocolError(_mismatch(self.role, version))
        event = codec.decode(frame_type, body)
        if frame_type in codec.HELLO_TYPES:
            self._peer_hello = event  # type: ignore[assignment]
        self._theirs = settle(new, self._ours)
        self._ours = settle(self._ours, self._theirs)
        return event


def _mismatch(role: Role, theirs: int) -> str:
    older = role.peer.value if theirs < PROTOCOL_VERSION else f"this {role.value}"
    return (f"PNC version mismatch: the {role.peer.value} speaks version {theirs}, this "
            f"{role.value} speaks version {PROTOCOL_VERSION}; upgrade the older side "
            f"({older}) so both speak the same version")


__all__ = ["Connection"]
