"""PNC states: the one table of which role may send which event in which state.

Each direction of the connection (ours, theirs) has its own state, driven by the events that
travel that way. A hello moves its direction from IDLE to HELLO_SENT; the direction becomes
OPEN once the hello going the other way exists too (`settle`): a sender may not say anything
but Goodbye until it has heard the other side's hello. Goodbye closes its direction for good.
Both sides apply the same table, to what they send and to what they receive.
"""
from __future__ import annotations

import enum

from edgegw.pnc.events import (
    Accept, Ban, Closed, GatewayHello, Goodbye, Load, NodeHello, Offer, Ping, Pong, Reject, Unban,
)


class Role(enum.Enum):
    GATEWAY = "gateway"
    NODE = "node"

    @property
    def peer(self) -> "Role":
        return Role.NODE if self is Role.GATEWAY else Role.GATEWAY


class State(enum.Enum):
    IDLE = "idle"              # no hello yet
    HELLO_SENT = "hello-sent"  # hello out; the sender has not seen the other side's hello
    OPEN = "open"              # both hellos exchanged
    CLOSED = "closed"          # Goodbye went this way; nothing follows it
    ERROR = "error"            # only as Connection.state: the peer broke the protocol


HELLO: dict[Role, type] = {Role.GATEWAY: GatewayHello, Role.NODE: NodeHello}

_S = State
TRANSITIONS: dict[tuple[Role, State], dict[type, State]] = {
    (Role.GATEWAY, _S.IDLE): {GatewayHello: _S.HELLO_SENT},
    (Role.GATEWAY, _S.HELLO_SENT): {Goodbye: _S.CLOSED},
    (Role.GATEWAY, _S.OPEN): {
        Offer: _S.OPEN, Closed: _S.OPEN, Ping: _S.OPEN, Pong: _S.OPEN, Goodbye: _S.CLOSED,
    },
    (Role.GATEWAY, _S.CLOSED): {},
    (Role.NODE, _S.IDLE): {NodeHello: _S.HELLO_SENT},
    (Role.NODE, _S.HELLO_SENT): {Goodbye: _S.CLOSED},
    (Role.NODE, _S.OPEN): {
        Accept: _S.OPEN, Reject: _S.OPEN, Load: _S.OPEN, Ban: _S.OPEN, Unban: _S.OPEN,
        Ping: _S.OPEN, Pong: _S.OPEN, Goodbye: _S.CLOSED,
    },
    (Role.NODE, _S.CLOSED): {},
}

SENDABLE: dict[Role, frozenset[type]] = {
    role: frozenset(t for (r, _), row in TRANSITIONS.items() if r is role for t in row)
    for role in Role
}


def next_state(sender: Role, state: State, event_type: type) -> State | None:
    """Where the sender's direction goes after `event_type`, or None if it may not send it."""
    return TRANSITIONS.get((sender, state), {}).get(event_type)


def settle(state: State, other: State) -> State:
    """A direction waiting for the other side's hello opens once that hello exists."""
    if state is State.HELLO_SENT and other is not State.IDLE:
        return State.OPEN
    return state


def explain(sender: Role, state: State, event_type: type) -> str:
    """Why `sender` may not send `event_type` now, in words an operator can act on."""
    name = event_type.__name__
    who = sender.value
    if event_type not in SENDABLE[sender]:
        if event_type in SENDABLE[sender.peer]:
            return f"a {who} never sends {name} (only a {sender.peer.value} does)"
        return f"{name} is not a PNC event"
    hello = HELLO[sender].__name__
    if state is State.IDLE:
        return f"the {who} sent {name} before its {hello}; the hello must come first"
    if state is State.HELLO_SENT:
        if event_type is HELLO[sender]:
            return f"the {who} sent a second {hello}"
        other = HELLO[sender.peer].__name__
        return f"the {who} sent {name} before the {other} arrived; only Goodbye may precede it"
    if state is State.CLOSED:
        return f"the {who} sent {name} after its Goodbye"
    return f"the {who} sent a second {hello}"


__all__ = ["HELLO", "Role", "SENDABLE", "State", "TRANSITIONS", "explain", "next_state", "settle"]
