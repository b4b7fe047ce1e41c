"""Fuzzing the PNC: whatever the bytes, the only exception is RemoteProtocolError.

Inputs are fed whole, one byte at a time and in random chunks; valid streams must decode to
exactly the events that were sent, however they are cut.
"""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgegw.pnc import (
    PROTOCOL_VERSION, Accept, Ban, Closed, Connection, Event, GatewayHello, Goodbye, Load,
    NodeHello, Offer, Ping, Pong, Reject, RemoteProtocolError, Role, Unban,
)
from edgegw.pnc import codec, framing

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U16, U32, U64 = (st.integers(0, 2**n - 1) for n in (16, 32, 64))
SESSION = st.integers(1, 2**64 - 1)
KEY = st.binary(min_size=32, max_size=32)
PRINTABLE = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
REASON = st.text(PRINTABLE | st.just(" "), max_size=60).filter(str.isprintable)
IDENT = st.text(PRINTABLE, min_size=1, max_size=60).filter(str.isprintable)
IP = st.ip_addresses().map(str)
NET = IP | st.builds("{}/{}".format, st.ip_addresses(v=4), st.integers(0, 32)) | st.builds(
    "{}/{}".format, st.ip_addresses(v=6), st.integers(0, 128))
WEIGHT = st.integers(1, 1000)
UNTIL = st.floats(0, 1e12, allow_nan=False, allow_infinity=False)

GW_HELLO = st.builds(GatewayHello, st.just(PROTOCOL_VERSION), IDENT, U16,
                     st.integers(1, 2**32 - 1), KEY)
NODE_HELLO = st.builds(NodeHello, st.just(PROTOCOL_VERSION), IDENT, U32, WEIGHT, U32,
                       st.booleans())
GATEWAY_EVENT = st.one_of(
    st.builds(Offer, SESSION, KEY, IP, U16, U32),
    st.builds(Closed, SESSION, U64, U64, U64, REASON),
    st.builds(Ping, U64), st.builds(Pong, U64),
)
NODE_EVENT = st.one_of(
    st.builds(Accept, SESSION),
    st.builds(Reject, SESSION, REASON, st.booleans()),
    st.builds(Load, U32, U32, WEIGHT, st.booleans()),
    st.builds(Ban, NET, UNTIL, REASON), st.builds(Unban, NET),
    st.builds(Ping, U64), st.builds(Pong, U64),
)
TYPES = sorted(codec.TYPE_LIMITS)


def wire(event: Event) -> bytes:
    return framing.encode_frame(*codec.encode(event))


def ready(role: Role, peer_hello: Event | None) -> Connection:
    """A connection that has sent its hello (and, if given, received the peer's)."""
    conn = Connection(role)
    if role is Role.GATEWAY:
        conn.send(GatewayHello(PROTOCOL_VERSION, "gw", 1, 1000, b"k" * 32))
    else:
        conn.send(NodeHello(PROTOCOL_VERSION, "node", 0, 1, 0, False))
    if peer_hello is not None:
        conn.receive_data(wire(peer_hello))
    return conn


def feed(conn: Connection, data: bytes, cuts: list[int]) -> list[Event] | RemoteProtocolError:
    """Feed `data` cut at `cuts`; the events, or the RemoteProtocolError it ended in.

    Any other exception escapes and fails the test: that is the invariant under test.
    """
    events: list[Event] = []
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(data)), len(data)]
    try:
        for lo, hi in zip(bounds, bounds[1:]):
            events.extend(conn.receive_data(data[lo:hi]))
    except RemoteProtocolError as exc:
        try:
            conn.receive_data(b"x")
        except RemoteProtocolError as again:  # dead for good, with the same message
            assert str(again) == str(exc)
        else:
            raise AssertionError("a dead connection accepted more data") from exc
        return exc
    return events


def every_way(role: Role, hello: Event | None, data: bytes, cuts: list[int]) -> None:
    """Whole, one byte at a time, and cut at random: never anything but RemoteProtocolError,
    and where no error occurs the three agree."""
    results = [feed(ready(role, hello), data, c) for c in ([], list(range(len(data))), cuts)]
    errors = [isinstance(r, RemoteProtocolError) for r in results]
    assert all(errors) or not any(errors), results
    if not any(errors):
        assert results[0] == results[1] == results[2]


CUTS = st.lists(st.integers(0, 400), max_size=8)
ROLE = st.sampled_from(list(Role))


@FUZZ
@given(role=ROLE, handshake=st.booleans(), data=st.binary(max_size=300), cuts=CUTS,
       hellos=st.tuples(GW_HELLO, NODE_HELLO))
def test_random_bytes(role: Role, handshake: bool, data: bytes, cuts: list[int],
                      hellos: tuple[GatewayHello, NodeHello]) -> None:
    hello = (hellos[1] if role is Role.GATEWAY else hellos[0]) if handshake else None
    every_way(role, hello, data, cuts)


@FUZZ
@given(role=ROLE, frame_type=st.sampled_from(TYPES) | st.integers(0, 255),
       length=st.integers(0, 300) | st.integers(0, 2**32 - 1), body=st.binary(max_size=300),
       cuts=CUTS, hellos=st.tuples(GW_HELLO, NODE_HELLO))
def test_random_frames(role: Role, frame_type: int, length: int, body: bytes, cuts: list[int],
                       hellos: tuple[GatewayHello, NodeHello]) -> None:
    """Well-formed headers with random types, lengths and bodies reach the codec."""
    hello = hellos[1] if role is Role.GATEWAY else hellos[0]
    exact = framing.HEADER.pack(len(body), frame_type) + body
    every_way(role, hello, exact, cuts)
    every_way(role, hello, framing.HEADER.pack(length, frame_type) + body, cuts)


@FUZZ
@given(frame_type=st.sampled_from(TYPES), body=st.binary(max_size=400))
def test_codec_decode_random_bodies(frame_type: int, body: bytes) -> None:
    try:
        event = codec.decode(frame_type, body)
    except RemoteProtocolError:
        return
    assert codec.encode(event) == (frame_type, body)  # what decodes re-encodes identically


def _stream(hello: Event, events: list[Event]) -> bytes:
    """What a peer of the other role sends after its hello."""
    return wire(hello) + b"".join(wire(e) for e in events)


SCRIPT = st.tuples(GW_HELLO, st.lists(GATEWAY_EVENT, max_size=6), NODE_HELLO,
                   st.lists(NODE_EVENT, max_size=6), st.booleans())


@FUZZ
@given(script=SCRIPT, role=ROLE, cuts=CUTS)
def test_valid_streams_round_trip(script: tuple, role: Role, cuts: list[int]) -> None:
    gw_hello, gw_events, node_hello, node_events, goodbye = script
    sent_by_peer = node_events if role is Role.GATEWAY else gw_events
    peer_hello = node_hello if role is Role.GATEWAY else gw_hello
    expected = [peer_hello, *sent_by_peer] + ([Goodbye("done")] if goodbye else [])
    data = b"".join(wire(e) for e in expected)
    for c in ([], list(range(len(data))), cuts):
        assert feed(ready(role, None), data, c) == expected


@FUZZ
@given(script=SCRIPT)
def test_two_connections_talk(script: tuple) -> None:
    """The bytes one Connection sends are exactly what the other reports, both ways."""
    gw_hello, gw_events, node_hello, node_events, _ = script
    gw, node = Connection(Role.GATEWAY), Connection(Role.NODE)
    assert node.receive_data(gw.send(gw_hello)) == [gw_hello]
    assert gw.receive_data(node.send(node_hello)) == [node_hello]
    assert node.receive_data(b"".join(gw.send(e) for e in gw_events)) == gw_events
    assert gw.receive_data(b"".join(node.send(e) for e in node_events)) == node_events


@FUZZ
@given(script=SCRIPT, role=ROLE, cuts=CUTS, data=st.data())
def test_mutated_streams(script: tuple, role: Role, cuts: list[int], data: st.DataObject) -> None:
    """Valid streams truncated, with bytes flipped, inserted or deleted, types or lengths
    rewritten: RemoteProtocolError or a clean decode, never anything else."""
    gw_hello, gw_events, node_hello, node_events, _ = script
    stream = (_stream(node_hello, node_events) if role is Role.GATEWAY
              else _stream(gw_hello, gw_events))
    buf = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "type",
                                        "length"]))
        at = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[at:at + data.draw(st.integers(1, 8))]
        elif op == "truncate":
            del buf[at:]
        elif op == "type" and len(buf) >= 5:  # rewrite the first frame's type byte
            buf[4] = data.draw(st.sampled_from(TYPES) | st.integers(0, 255))
        elif op == "length" and len(buf) >= 4:
            buf[0:4] = struct.pack(">I", data.draw(st.integers(0, 2**32 - 1)))
    every_way(role, None, bytes(buf), cuts)


@FUZZ
@given(version=U16.filter(lambda v: v != PROTOCOL_VERSION), tail=st.binary(max_size=40))
def test_any_other_version_is_named(version: int, tail: bytes) -> None:
    body = struct.pack(">H", version) + tail
    result = feed(ready(Role.NODE, None), framing.HEADER.pack(len(body), 0x01) + body, [])
    assert isinstance(result, RemoteProtocolError) and "version mismatch" in str(result)
