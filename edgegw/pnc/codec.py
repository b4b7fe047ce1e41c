"""PNC codec: each event's body as a fixed struct, then its text fields, and nothing more.

Body layout per event: the fixed-size fields in the order listed in `_SPECS` (big-endian), then
each text field as a u16 byte length and that many bytes of UTF-8. Strict both ways, with one
set of field checks: `encode` raises LocalProtocolError (our bug), `decode` RemoteProtocolError
(the peer's). Booleans are 0 or 1, text is printable UTF-8 under a byte cap, addresses parse
with `ipaddress`, and a body with bytes left over is refused.
"""
from __future__ import annotations

import builtins
import ipaddress
import math
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from edgegw.pnc.errors import LocalProtocolError, RemoteProtocolError
from edgegw.pnc.events import (
    Accept, Ban, Closed, Event, GatewayHello, Goodbye, Load, NodeHello, Offer, Ping, Pong, Reject,
    Unban,
)

MAX_TEXT = 256        # ids and reasons, in UTF-8 bytes
MAX_IP_TEXT = 64      # longest IPv6 text with a scope or prefix fits easily
KEY_LEN = 32          # offer secrets and pool keys
U64_MAX = 2**64 - 1

_Check = Callable[[Any], "str | None"]


class _Kind(NamedTuple):
    code: str                 # struct code of a fixed field; "" marks a text field
    check: _Check             # the problem with a value, or None when it is fine
    cap: int = 0              # text fields: byte cap


def _int(lo: int, hi: int) -> _Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool):
            return f"must be an int, got {type(v).__name__}"
        if not lo <= v <= hi:
            return f"must be in {lo}..{hi}, got {v}"
        return None
    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be a bool, got {type(v).__name__}"


def _key(v: Any) -> str | None:
    if not isinstance(v, bytes):
        return f"must be bytes, got {type(v).__name__}"
    return None if len(v) == KEY_LEN else f"must be exactly {KEY_LEN} bytes, got {len(v)}"


def _time(v: Any) -> str | None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return f"must be a number, got {type(v).__name__}"
    return None if math.isfinite(v) and v >= 0 else f"must be a finite time >= 0, got {v}"


def _text(min_len: int) -> _Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be str, got {type(v).__name__}"
        if len(v) < min_len:
            return "must not be empty"
        return None if v.isprintable() else "must be printable text (no control characters)"
    return check


def _show(v: Any) -> str:
    """A value for an error message, cut short: it may be hostile and long."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _ip(v: Any) -> str | None:
    if not isinstance(v, str) or not v.isascii():
        return f"must be an IP address as ASCII text, got {_show(v)}"
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return f"is not an IP address: {_show(v)}"
    return None


def _net(v: Any) -> str | None:
    if not isinstance(v, str) or not v.isascii():
        return f"must be an address or CIDR as ASCII text, got {_show(v)}"
    try:
        ipaddress.ip_network(v, strict=False)
    except ValueError:
        return f"is not an address or CIDR: {_show(v)}"
    return None


U16 = _Kind("H", _int(0, 0xFFFF))
U32 = _Kind("I", _int(0, 0xFFFF_FFFF))
U64 = _Kind("Q", _int(0, U64_MAX))
PORT = U16
INTERVAL = _Kind("I", _int(1, 0xFFFF_FFFF))
SESSION = _Kind("Q", _int(1, U64_MAX))
WEIGHT = _Kind("H", _int(1, 1000))
BOOL = _Kind("B", _bool)
KEY = _Kind(f"{KEY_LEN}s", _key)
TIME = _Kind("d", _time)
ID = _Kind("", _text(1), MAX_TEXT)
REASON = _Kind("", _text(0), MAX_TEXT)
IP = _Kind("", _ip, MAX_IP_TEXT)
NET = _Kind("", _net, MAX_IP_TEXT)


class _Spec(NamedTuple):
    type: int
    cls: builtins.type   # the field above shadows the name inside this body
    fixed: struct.Struct
    fixed_fields: tuple[tuple[str, _Kind], ...]
    text_fields: tuple[tuple[str, _Kind], ...]
    max_body: int


def _spec(frame_type: int, cls: type, **fields: _Kind) -> _Spec:
    fixed = tuple((n, k) for n, k in fields.items() if k.code)
    texts = tuple((n, k) for n, k in fields.items() if not k.code)
    st = struct.Struct(">" + "".join(k.code for _, k in fixed))
    return _Spec(frame_type, cls, st, fixed, texts, st.size + sum(2 + k.cap for _, k in texts))


# Hellos keep `version` first so that a peer of any version can read it (see hello_version).
_SPECS = (
    _spec(0x01, GatewayHello, version=U16, data_port=PORT, heartbeat_interval_ms=INTERVAL,
          pool_key=KEY, gateway_id=ID),
    _spec(0x02, NodeHello, version=U16, capacity=U32, weight=WEIGHT, active=U32, draining=BOOL,
          node_id=ID),
    _spec(0x10, Offer, session_id=SESSION, secret=KEY, client_port=PORT, expires_ms=U32,
          client_ip=IP),
    _spec(0x11, Accept, session_id=SESSION),
    _spec(0x12, Reject, session_id=SESSION, retry_elsewhere=BOOL, reason=REASON),
    _spec(0x13, Closed, session_id=SESSION, bytes_up=U64, bytes_down=U64, duration_ms=U64,
          reason=REASON),
    _spec(0x20, Load, active=U32, capacity=U32, weight=WEIGHT, draining=BOOL),
    _spec(0x21, Ban, until=TIME, ip=NET, reason=REASON),
    _spec(0x22, Unban, ip=NET),
    _spec(0x30, Ping, seq=U64),
    _spec(0x31, Pong, seq=U64),
    _spec(0x3F, Goodbye, reason=REASON),
)
_BY_CLASS: dict[type, _Spec] = {s.cls: s for s in _SPECS}
_BY_TYPE: dict[int, _Spec] = {s.type: s for s in _SPECS}

TYPE_OF: dict[type, int] = {s.cls: s.type for s in _SPECS}
CLASS_OF: dict[int, type] = {s.type: s.cls for s in _SPECS}
TYPE_LIMITS: dict[int, int] = {s.type: s.max_body for s in _SPECS}
HELLO_TYPES = frozenset({TYPE_OF[GatewayHello], TYPE_OF[NodeHello]})
_LEN = struct.Struct(">H")
_VERSION = struct.Struct(">H")


def encode(event: Event) -> tuple[int, bytes]:
    """(frame type, body) for `event`; LocalProtocolError names the first bad field."""
    spec = _BY_CLASS.get(type(event))
    if spec is None:
        raise LocalProtocolError(f"not a PNC event: {event!r}")
    name = spec.cls.__name__
    values = []
    for field, kind in spec.fixed_fields:
        v = getattr(event, field)
        problem = kind.check(v)
        if problem is not None:
            raise LocalProtocolError(f"{name}.{field} {problem}")
        values.append(float(v) if kind is TIME else v)
    parts = [spec.fixed.pack(*values)]
    for field, kind in spec.text_fields:
        v = getattr(event, field)
        problem = kind.check(v)
        if problem is not None:
            raise LocalProtocolError(f"{name}.{field} {problem}")
        raw = v.encode("utf-8")  # cannot fail: isprintable() already refused surrogates
        if len(raw) > kind.cap:
            raise LocalProtocolError(
                f"{name}.{field} is {len(raw)} bytes of UTF-8; the cap is {kind.cap}: shorten it")
        parts.append(_LEN.pack(len(raw)))
        parts.append(raw)
    return spec.type, b"".join(parts)


def hello_version(body: bytes) -> int:
    """The version a hello claims, read before anything else so a mismatch is named as such."""
    if len(body) < _VERSION.size:
        raise RemoteProtocolError("hello too short to carry a protocol version")
    return int(_VERSION.unpack_from(body)[0])


def decode(frame_type: int, body: bytes) -> Event:
    """The event in one frame body; RemoteProtocolError for anything malformed."""
    spec = _BY_TYPE.get(frame_type)
    if spec is None:
        raise RemoteProtocolError(f"unknown PNC frame type 0x{frame_type:02x}")
    name = spec.cls.__name__
    fixed = spec.fixed
    if len(body) < fixed.size:
        raise RemoteProtocolError(
            f"{name} body is {len(body)} bytes; its fixed part alone needs {fixed.size}")
    kwargs: dict[str, Any] = {}
    for (field, kind), v in zip(spec.fixed_fields, fixed.unpack_from(body)):
        if kind is BOOL:
            if v > 1:
                raise RemoteProtocolError(f"{name}.{field} must be 0 or 1, got {v}")
            v = bool(v)
        problem = kind.check(v)
        if problem is not None:
            raise RemoteProtocolError(f"{name}.{field} {problem}")
        kwargs[field] = v
    pos = fixed.size
    end = len(body)
    for field, kind in spec.text_fields:
        if end - pos < 2:
            raise RemoteProtocolError(f"{name}.{field}: truncated length")
        (n,) = _LEN.unpack_from(body, pos)
        pos += 2
        if n > kind.cap:
            raise RemoteProtocolError(f"{name}.{field} is {n} bytes; the cap is {kind.cap}")
        if end - pos < n:
            raise RemoteProtocolError(f"{name}.{field}: {n} bytes announced, {end - pos} left")
        try:
            v = body[pos:pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"{name}.{field} is not valid UTF-8") from None
        pos += n
        problem = kind.check(v)
        if problem is not None:
            raise RemoteProtocolError(f"{name}.{field} {problem}")
        kwargs[field] = v
    if pos != end:
        raise RemoteProtocolError(f"{name} has {end - pos} trailing bytes")
    return spec.cls(**kwargs)  # type: ignore[no-any-return]


__all__ = [
    "CLASS_OF", "HELLO_TYPES", "KEY_LEN", "MAX_IP_TEXT", "MAX_TEXT", "TYPE_LIMITS", "TYPE_OF",
    "decode", "encode", "hello_version",
]
