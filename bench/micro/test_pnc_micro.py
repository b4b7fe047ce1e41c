"""PNC micro-benchmarks: the cost of the control messages on a session's critical path.

Run: python -m pytest bench/micro -q --benchmark-enable
"""
from __future__ import annotations

from typing import Any

import pytest

from edgegw.pnc import (
    PROTOCOL_VERSION, Accept, Closed, Connection, Event, GatewayHello, NodeHello, Offer, Role,
)
from edgegw.pnc import codec, framing

KEY = bytes(range(32))
EVENTS: dict[str, Event] = {
    "offer": Offer(0x1122334455667788, KEY, "2001:db8::42", 50022, 3000),
    "accept": Accept(0x1122334455667788),
    "closed": Closed(0x1122334455667788, 1 << 30, 1 << 20, 61_500, "client closed"),
}


def _frame(event: Event) -> bytes:
    return framing.encode_frame(*codec.encode(event))


@pytest.mark.parametrize("name", list(EVENTS))
def test_encode_frame(benchmark: Any, name: str) -> None:
    event = EVENTS[name]
    assert benchmark(_frame, event)


@pytest.mark.parametrize("name", list(EVENTS))
def test_decode_frame(benchmark: Any, name: str) -> None:
    event = EVENTS[name]
    data = _frame(event)
    reader = framing.FrameReader(codec.TYPE_LIMITS)

    def decode() -> list[Event]:
        return [codec.decode(t, body) for t, body in reader.feed(data)]

    assert benchmark(decode) == [event]


def _pair() -> tuple[Connection, Connection]:
    gw, node = Connection(Role.GATEWAY), Connection(Role.NODE)
    node.receive_data(gw.send(GatewayHello(PROTOCOL_VERSION, "gw", 2222, 1000, KEY)))
    gw.receive_data(node.send(NodeHello(PROTOCOL_VERSION, "node", 0, 1, 0, False)))
    return gw, node


def test_offer_accept_round(benchmark: Any) -> None:
    """Gateway sends an offer, the node receives it and accepts, the gateway reads the answer."""
    gw, node = _pair()
    offer = EVENTS["offer"]

    def round_trip() -> list[Event]:
        (got,) = node.receive_data(gw.send(offer))
        return gw.receive_data(node.send(Accept(got.session_id)))  # type: ignore[union-attr]

    assert benchmark(round_trip) == [EVENTS["accept"]]
