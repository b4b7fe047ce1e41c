"""PROXY protocol v1/v2: round trips, the spec's examples, and garbage that must be refused."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from edgegw import proxyproto
from edgegw.proxyproto import ProxyProtocolError


def _parse(wire: bytes) -> proxyproto.ProxyInfo:
    if proxyproto.version_of(wire[:proxyproto.PREFIX_LEN]) == 1:
        return proxyproto.parse_v1(wire)
    n = proxyproto.v2_body_length(wire[:16])
    if len(wire) != 16 + n:
        raise ProxyProtocolError("length mismatch")
    return proxyproto.parse_v2(wire[:16], wire[16:])


@pytest.mark.parametrize("src,dst", [
    (("192.0.2.10", 51234), ("198.51.100.1", 22)),
    (("2001:db8::1", 40000), ("2001:db8::2", 2222)),
])
@pytest.mark.parametrize("build", [proxyproto.build_v1, proxyproto.build_v2])
def test_round_trip(build, src, dst) -> None:  # type: ignore[no-untyped-def]
    assert _parse(build(src, dst)) == proxyproto.ProxyInfo(src, dst)


def test_v1_unknown_and_local() -> None:
    assert proxyproto.parse_v1(b"PROXY UNKNOWN\r\n") == proxyproto.ProxyInfo(None, None)
    local = proxyproto.V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    assert proxyproto.parse_v2(local, b"") == proxyproto.ProxyInfo(None, None)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",            # no CR
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",            # missing port
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",              # family mismatch
    b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n",      # port out of range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 extra\r\n",
    b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"1" * 120 + b"\r\n",
])
def test_v1_garbage_refused(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        proxyproto.parse_v1(line)


def test_not_a_proxy_header() -> None:
    with pytest.raises(ProxyProtocolError):
        proxyproto.version_of(b"SSH-2.")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    try:
        _parse(proxyproto.V2_SIGNATURE + data)
    except ProxyProtocolError:
        pass
    try:
        _parse(b"PROXY " + data)
    except ProxyProtocolError:
        pass
