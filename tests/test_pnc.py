"""The PNC state machine and codec, driven with bytes: no sockets, no clock."""
from __future__ import annotations

import struct

import pytest

from edgegw.pnc import (
    MAX_BODY, PROTOCOL_VERSION, Accept, Ban, Closed, Connection, GatewayHello, Goodbye, Load,
    LocalProtocolError, NodeHello, Offer, Ping, Pong, Reject, RemoteProtocolError, Role, State,
    Unban,
)
from edgegw.pnc import codec, framing
from edgegw.pnc.state import SENDABLE, TRANSITIONS

KEY = bytes(range(32))
GW_HELLO = GatewayHello(PROTOCOL_VERSION, "gw-1", 2222, 1000, KEY)
NODE_HELLO = NodeHello(PROTOCOL_VERSION, "node-ä", 100, 10, 3, False)

GATEWAY_EVENTS = [
    Offer(1, KEY, "203.0.113.9", 50022, 3000),
    Offer(2**64 - 1, KEY, "2001:db8::1", 0, 0),
    Offer(7, KEY, "fe80::1%eth0", 65535, 2**32 - 1),
    Closed(1, 0, 2**64 - 1, 12345, "client closed"),
    Ping(0), Ping(2**64 - 1), Pong(9),
    Goodbye("gateway shutting down"),
]
NODE_EVENTS = [
    Accept(1), Accept(2**64 - 1),
    Reject(3, "banned"), Reject(4, "", retry_elsewhere=True),
    Load(0, 0, 1, False), Load(2**32 - 1, 2**32 - 1, 1000, True),
    Ban("198.51.100.7", 1.7e9, "5 failed logins"), Ban("2001:db8::/32", 0, "ténor"),
    Ban("10.1.2.3/8", 1e9 + 0.5, "x" * 256), Unban("10.0.0.0/8"),
    Ping(5), Pong(0), Goodbye("draining finished"),
]


def wire(event: object) -> bytes:
    """A frame for `event` with no state checks: what a (possibly broken) peer could send."""
    return framing.encode_frame(*codec.encode(event))  # type: ignore[arg-type]


def frame(frame_type: int, body: bytes) -> bytes:
    return framing.HEADER.pack(len(body), frame_type) + body


def text(s: bytes) -> bytes:
    return struct.pack(">H", len(s)) + s


def pair() -> tuple[Connection, Connection]:
    gw, node = Connection(Role.GATEWAY), Connection(Role.NODE)
    assert node.receive_data(gw.send(GW_HELLO)) == [GW_HELLO]
    assert gw.receive_data(node.send(NODE_HELLO)) == [NODE_HELLO]
    return gw, node


def opened(role: Role) -> Connection:
    """A connection of `role` that has sent its hello and received the peer's."""
    conn = Connection(role)
    conn.send(GW_HELLO if role is Role.GATEWAY else NODE_HELLO)
    conn.receive_data(wire(NODE_HELLO if role is Role.GATEWAY else GW_HELLO))
    return conn


# -- round trips and the handshake --------------------------------------------------------

@pytest.mark.parametrize("event", GATEWAY_EVENTS, ids=repr)
def test_gateway_events_round_trip(event: object) -> None:
    gw, node = pair()
    assert node.receive_data(gw.send(event)) == [event]  # type: ignore[arg-type]


@pytest.mark.parametrize("event", NODE_EVENTS, ids=repr)
def test_node_events_round_trip(event: object) -> None:
    gw, node = pair()
    assert gw.receive_data(node.send(event)) == [event]  # type: ignore[arg-type]


@pytest.mark.parametrize("event", [GW_HELLO, NODE_HELLO, *GATEWAY_EVENTS, *NODE_EVENTS], ids=repr)
def test_codec_round_trip(event: object) -> None:
    frame_type, body = codec.encode(event)  # type: ignore[arg-type]
    assert codec.decode(frame_type, body) == event
    assert len(body) <= codec.TYPE_LIMITS[frame_type]


def test_every_event_type_is_covered() -> None:
    covered = {type(e) for e in [GW_HELLO, NODE_HELLO, *GATEWAY_EVENTS, *NODE_EVENTS]}
    assert covered == set(codec.TYPE_OF)


@pytest.mark.parametrize("gateway_first", [True, False])
def test_hello_exchange_in_either_order(gateway_first: bool) -> None:
    gw, node = Connection(Role.GATEWAY), Connection(Role.NODE)
    assert gw.state is State.IDLE and gw.peer_hello is None and gw.their_version is None
    if gateway_first:
        data = gw.send(GW_HELLO)
        assert gw.state is State.HELLO_SENT
        assert node.receive_data(data) == [GW_HELLO]
        assert node.state is State.IDLE  # heard the gateway, has not said hello itself
        assert gw.receive_data(node.send(NODE_HELLO)) == [NODE_HELLO]
    else:
        data = node.send(NODE_HELLO)
        assert gw.receive_data(data) == [NODE_HELLO]
        assert node.receive_data(gw.send(GW_HELLO)) == [GW_HELLO]
    assert gw.state is node.state is State.OPEN
    assert gw.peer_hello == NODE_HELLO and node.peer_hello == GW_HELLO
    assert gw.their_version == node.their_version == PROTOCOL_VERSION


def test_hellos_and_events_in_one_chunk() -> None:
    node = Connection(Role.NODE)
    node.send(NODE_HELLO)
    events = node.receive_data(wire(GW_HELLO) + wire(GATEWAY_EVENTS[0]) + wire(Ping(1)))
    assert events == [GW_HELLO, GATEWAY_EVENTS[0], Ping(1)]


@pytest.mark.parametrize("theirs,older", [(PROTOCOL_VERSION + 1, "this node"),
                                          (PROTOCOL_VERSION - 1, "the gateway")])
def test_version_mismatch_names_both_versions(theirs: int, older: str) -> None:
    node = Connection(Role.NODE)
    node.send(NODE_HELLO)
    hello = GatewayHello(theirs, "gw", 1, 1, KEY)
    with pytest.raises(RemoteProtocolError) as info:
        node.receive_data(wire(hello))
    msg = str(info.value)
    assert f"version {theirs}" in msg and f"version {PROTOCOL_VERSION}" in msg
    assert "upgrade the older side" in msg and older in msg
    assert node.their_version == theirs and node.peer_hello is None
    assert node.state is State.ERROR
    assert node.send(Goodbye(msg[:256]))  # the newer side can still say why


def test_version_is_read_before_the_rest_of_the_hello() -> None:
    """A future hello may look nothing like ours; the mismatch must still be named."""
    gw = Connection(Role.GATEWAY)
    with pytest.raises(RemoteProtocolError, match="version mismatch"):
        gw.receive_data(frame(0x02, struct.pack(">H", 9) + b"\xff" * 3))


def test_sending_a_hello_of_another_version_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="version"):
        Connection(Role.GATEWAY).send(GatewayHello(PROTOCOL_VERSION + 1, "gw", 1, 1, KEY))


# -- who may send what, when ---------------------------------------------------------------

ALL_SAMPLES = {type(e): e for e in [GW_HELLO, NODE_HELLO, *GATEWAY_EVENTS, *NODE_EVENTS]}


@pytest.mark.parametrize("role", list(Role))
def test_role_violations(role: Role) -> None:
    forbidden = [e for t, e in ALL_SAMPLES.items() if t not in SENDABLE[role]]
    assert forbidden
    for event in forbidden:
        with pytest.raises(LocalProtocolError, match="never sends"):
            opened(role).send(event)
        # the same event arriving from a peer of our own role is the peer's fault
        with pytest.raises(RemoteProtocolError, match="never sends"):
            opened(role.peer).receive_data(wire(event))


def test_nothing_before_our_own_hello() -> None:
    gw = Connection(Role.GATEWAY)
    for event in (GATEWAY_EVENTS[0], Ping(1), Goodbye("x")):
        with pytest.raises(LocalProtocolError, match="before its GatewayHello"):
            gw.send(event)
    assert gw.state is State.IDLE


def test_only_goodbye_before_the_peers_hello() -> None:
    gw = Connection(Role.GATEWAY)
    gw.send(GW_HELLO)
    with pytest.raises(LocalProtocolError, match="before the NodeHello arrived"):
        gw.send(GATEWAY_EVENTS[0])
    gw.send(Goodbye("giving up"))
    assert gw.our_state is State.CLOSED


def test_peer_must_start_with_its_hello() -> None:
    node = Connection(Role.NODE)
    node.send(NODE_HELLO)
    with pytest.raises(RemoteProtocolError, match="before its GatewayHello"):
        node.receive_data(wire(GATEWAY_EVENTS[0]))


def test_peer_may_not_talk_before_we_said_hello() -> None:
    """It cannot have heard our hello yet, so anything but Goodbye is out of order."""
    gw = Connection(Role.GATEWAY)
    assert gw.receive_data(wire(NODE_HELLO)) == [NODE_HELLO]
    with pytest.raises(RemoteProtocolError, match="before the GatewayHello arrived"):
        gw.receive_data(wire(Accept(1)))
    gw2 = Connection(Role.GATEWAY)
    assert gw2.receive_data(wire(NODE_HELLO) + wire(Goodbye("no"))) == [NODE_HELLO, Goodbye("no")]


def test_second_hello_is_refused_both_ways() -> None:
    gw, node = pair()
    with pytest.raises(LocalProtocolError, match="second GatewayHello"):
        gw.send(GW_HELLO)
    with pytest.raises(RemoteProtocolError, match="second GatewayHello"):
        node.receive_data(wire(GW_HELLO))


def test_table_states_cover_both_roles() -> None:
    for role in Role:
        for st in (State.IDLE, State.HELLO_SENT, State.OPEN, State.CLOSED):
            assert (role, st) in TRANSITIONS


def test_local_error_changes_nothing() -> None:
    gw, node = pair()
    with pytest.raises(LocalProtocolError):
        gw.send(Accept(1))
    with pytest.raises(LocalProtocolError):
        gw.send(Offer(0, KEY, "1.2.3.4", 1, 1))
    assert gw.state is State.OPEN
    assert node.receive_data(gw.send(Ping(3))) == [Ping(3)]


# -- Goodbye and errors ----------------------------------------------------------------------

def test_goodbye_closes_only_its_direction() -> None:
    gw, node = pair()
    assert node.receive_data(gw.send(Goodbye("restart"))) == [Goodbye("restart")]
    assert gw.our_state is State.CLOSED and gw.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="after its Goodbye"):
        gw.send(Ping(1))
    # the other direction still flows: answers in flight arrive, the node may say goodbye too
    assert gw.receive_data(node.send(Accept(5)) + node.send(Goodbye("ok"))) == [
        Accept(5), Goodbye("ok")]
    with pytest.raises(LocalProtocolError):
        node.send(Ping(2))


def test_data_after_goodbye_is_a_remote_error() -> None:
    gw, _ = pair()
    with pytest.raises(RemoteProtocolError, match="after its Goodbye"):
        gw.receive_data(wire(Goodbye("bye")) + wire(Ping(1)))
    gw, _ = pair()
    with pytest.raises(RemoteProtocolError, match="after its Goodbye"):
        gw.receive_data(wire(Goodbye("bye")) + b"\x00")  # even a partial frame
    gw, _ = pair()
    assert gw.receive_data(wire(Goodbye("bye"))) == [Goodbye("bye")]
    with pytest.raises(RemoteProtocolError, match="after its Goodbye"):
        gw.receive_data(b"\x00")


def test_remote_error_is_sticky() -> None:
    gw, _ = pair()
    with pytest.raises(RemoteProtocolError) as first:
        gw.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError) as again:
        gw.receive_data(wire(Ping(1)))
    assert str(again.value) == str(first.value) and gw.error is first.value
    assert gw.state is State.ERROR
    with pytest.raises(LocalProtocolError, match="only Goodbye"):
        gw.send(Ping(1))
    assert gw.send(Goodbye("protocol error")).endswith(b"protocol error")


def test_empty_data_is_no_event() -> None:
    assert Connection(Role.NODE).receive_data(b"") == []


# -- framing ------------------------------------------------------------------------------------

def test_oversize_frame_rejected_on_its_length_alone() -> None:
    node = Connection(Role.NODE)
    with pytest.raises(RemoteProtocolError, match="cap"):
        node.receive_data(struct.pack(">I", MAX_BODY + 1))  # no type, no body yet


def test_type_limit_rejected_on_the_header() -> None:
    gw = opened(Role.GATEWAY)
    with pytest.raises(RemoteProtocolError, match="at most"):
        gw.receive_data(framing.HEADER.pack(codec.TYPE_LIMITS[0x11] + 1, 0x11))
    with pytest.raises(RemoteProtocolError, match="unknown PNC frame type 0xee"):
        opened(Role.GATEWAY).receive_data(framing.HEADER.pack(1, 0xEE))


def test_own_oversize_frame_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="cap"):
        framing.encode_frame(0x3F, b"x" * (MAX_BODY + 1))


def test_receive_buffer_stays_bounded() -> None:
    reader = framing.FrameReader({1: MAX_BODY})
    data = frame(1, b"a" * MAX_BODY) * 3
    for i in range(0, len(data), 7777):
        reader.feed(data[i:i + 7777])
        assert reader.buffered < framing.HEADER_LEN + MAX_BODY
    assert reader.buffered == 0


def test_byte_by_byte_equals_whole() -> None:
    stream = wire(GW_HELLO) + b"".join(wire(e) for e in GATEWAY_EVENTS)
    whole = opened_node_waiting().receive_data(stream)
    node = opened_node_waiting()
    single = [e for i in range(len(stream)) for e in node.receive_data(stream[i:i + 1])]
    assert single == whole == [GW_HELLO, *GATEWAY_EVENTS]


def opened_node_waiting() -> Connection:
    node = Connection(Role.NODE)
    node.send(NODE_HELLO)
    return node


# -- field validation -------------------------------------------------------------------------

BAD_SENDS = [
    (Role.GATEWAY, Offer(0, KEY, "1.2.3.4", 1, 1), "session_id"),
    (Role.GATEWAY, Offer(2**64, KEY, "1.2.3.4", 1, 1), "session_id"),
    (Role.GATEWAY, Offer(1, KEY[:31], "1.2.3.4", 1, 1), "exactly 32 bytes"),
    (Role.GATEWAY, Offer(1, KEY, "1.2.3.400", 1, 1), "not an IP"),
    (Role.GATEWAY, Offer(1, KEY, "10.0.0.0/8", 1, 1), "not an IP"),
    (Role.GATEWAY, Offer(1, KEY, "1.2.3.4", 65536, 1), "client_port"),
    (Role.GATEWAY, Offer(1, KEY, "1.2.3.4", -1, 1), "client_port"),
    (Role.GATEWAY, Offer(True, KEY, "1.2.3.4", 1, 1), "int"),
    (Role.GATEWAY, Closed(1, -1, 0, 0, "x"), "bytes_up"),
    (Role.GATEWAY, Closed(1, 0, 0, 0, "é" * 129), "cap is 256"),
    (Role.GATEWAY, Goodbye("line\nbreak"), "printable"),
    (Role.GATEWAY, Goodbye("\ud800"), "printable"),
    (Role.NODE, Accept(0), "session"),
    (Role.NODE, Load(0, 0, 0, False), "weight"),
    (Role.NODE, Load(0, 0, 1001, False), "weight"),
    (Role.NODE, Ban("not-an-ip", 1.0, "x"), "not an address"),
    (Role.NODE, Ban("1.2.3.4", float("nan"), "x"), "finite"),
    (Role.NODE, Ban("1.2.3.4", -1.0, "x"), "finite"),
    (Role.NODE, Unban("١.٢.٣.٤"), "ASCII"),
    (Role.NODE, Reject(1, 42, False), "str"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("role,event,why", BAD_SENDS, ids=lambda v: repr(v)[:40])
def test_bad_fields_refused_on_send(role: Role, event: object, why: str) -> None:
    with pytest.raises(LocalProtocolError, match=why):
        opened(role).send(event)  # type: ignore[arg-type]


@pytest.mark.parametrize("hello,why", [
    (NodeHello(PROTOCOL_VERSION, "", 1, 1, 0, False), "empty"),
    (NodeHello(PROTOCOL_VERSION, "n", 1, 0, 0, False), "weight"),
    (NodeHello(PROTOCOL_VERSION, "n", -1, 1, 0, False), "capacity"),
])
def test_bad_hello_refused_on_send(hello: NodeHello, why: str) -> None:
    with pytest.raises(LocalProtocolError, match=why):
        Connection(Role.NODE).send(hello)


OFFER_FIXED = struct.Struct(">Q32sHI")
BAD_FRAMES = [
    (frame(0x10, OFFER_FIXED.pack(0, KEY, 1, 1) + text(b"1.2.3.4")), "session_id"),
    (frame(0x10, OFFER_FIXED.pack(1, KEY, 1, 1) + text(b"1.2.3.4") + b"\x00"), "trailing"),
    (frame(0x10, OFFER_FIXED.pack(1, KEY, 1, 1) + text(b"example.com")), "not an IP"),
    (frame(0x10, OFFER_FIXED.pack(1, KEY, 1, 1) + text(b"\xc3(")), "not an IP|UTF-8"),
    (frame(0x10, OFFER_FIXED.pack(1, KEY, 1, 1) + struct.pack(">H", 10) + b"1.2"), "announced"),
    (frame(0x10, OFFER_FIXED.pack(1, KEY, 1, 1)), "truncated length"),
    (frame(0x10, OFFER_FIXED.pack(1, KEY, 1, 1)[:-1]), "fixed part"),
    (frame(0x13, struct.pack(">QQQQ", 1, 0, 0, 0) + struct.pack(">H", 257) + b"x" * 257), "at most"),
    (frame(0x13, struct.pack(">QQQQ", 1, 0, 0, 0) + text(b"\xff")), "UTF-8"),
    (frame(0x13, struct.pack(">QQQQ", 1, 0, 0, 0) + text(b"a\x1bb")), "printable"),
    (frame(0x30, b"\x00" * 7), "fixed part"),
    (frame(0x30, b"\x00" * 9), "at most"),
]


@pytest.mark.parametrize("data,why", BAD_FRAMES, ids=lambda v: repr(v)[:40])
def test_bad_frames_are_remote_errors(data: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        opened(Role.NODE).receive_data(data)


@pytest.mark.parametrize("data,why", [
    (frame(0x11, struct.pack(">QB", 1, 0)), "at most 8"),
    (frame(0x12, struct.pack(">QB", 1, 2) + text(b"x")), "0 or 1"),
    (frame(0x20, struct.pack(">IIHB", 0, 0, 1001, 0)), "weight"),
    (frame(0x21, struct.pack(">d", float("inf")) + text(b"1.2.3.4") + text(b"")), "finite"),
    (frame(0x21, struct.pack(">d", 1.0) + text(b"1" * 65) + text(b"")), "cap is 64"),
    (frame(0x21, struct.pack(">d", 1.0) + text(b"1.2.3.4/33") + text(b"")), "CIDR"),
    (frame(0x22, text(b"")), "CIDR"),
])
def test_bad_node_frames_are_remote_errors(data: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        opened(Role.GATEWAY).receive_data(data)


def test_hello_too_short_for_a_version() -> None:
    with pytest.raises(RemoteProtocolError, match="too short"):
        Connection(Role.GATEWAY).receive_data(frame(0x02, b"\x01"))
