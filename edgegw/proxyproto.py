"""PROXY protocol v1 and v2 (the HAProxy spec): parse what a load balancer prepends, build
what a server behind the node expects. Sans-IO; every malformed header is a ProxyProtocolError.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107          # longest legal v1 line, CRLF included
V2_MAX_BODY = 2048    # addresses plus TLVs we are willing to buffer
PREFIX_LEN = 6        # enough to tell v1 ("PROXY ") from v2 (signature start)


class ProxyProtocolError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """Addresses carried by a header; None when the sender had none to give (LOCAL/UNKNOWN)."""

    src: tuple[str, int] | None
    dst: tuple[str, int] | None


def version_of(prefix: bytes) -> int:
    """1 or 2 from the first PREFIX_LEN bytes; ProxyProtocolError for anything else."""
    if prefix == V1_PREFIX:
        return 1
    if prefix == V2_SIGNATURE[:PREFIX_LEN]:
        return 2
    raise ProxyProtocolError("connection does not start with a PROXY protocol header")


def parse_v1(line: bytes) -> ProxyInfo:
    """Parse a full v1 line including the trailing CRLF."""
    if len(line) > V1_MAX or not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyProtocolError("malformed PROXY v1 line")
    try:
        parts = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyInfo(None, None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("PROXY v1 needs: PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    want = 4 if parts[1] == "TCP4" else 6
    src = _addr(parts[2], parts[4], want)
    dst = _addr(parts[3], parts[5], want)
    return ProxyInfo(src, dst)


def v2_body_length(header: bytes) -> int:
    """From the fixed 16-byte v2 header, how many bytes follow it."""
    if len(header) != 16 or header[:12] != V2_SIGNATURE:
        raise ProxyProtocolError("malformed PROXY v2 signature")
    if header[12] >> 4 != 2:
        raise ProxyProtocolError(f"unsupported PROXY v2 version {header[12] >> 4}")
    (length,) = struct.unpack("!H", header[14:16])
    if length > V2_MAX_BODY:
        raise ProxyProtocolError(f"PROXY v2 header too long ({length} bytes)")
    return length


def parse_v2(header: bytes, body: bytes) -> ProxyInfo:
    length = v2_body_length(header)
    if len(body) != length:
        raise ProxyProtocolError("truncated PROXY v2 header")
    command, family = header[12] & 0x0F, header[13]
    if command == 0x0:   # LOCAL: the balancer's own health check; no client address
        return ProxyInfo(None, None)
    if command != 0x1:
        raise ProxyProtocolError(f"unknown PROXY v2 command {command}")
    if family == 0x11:   # TCP over IPv4
        if length < 12:
            raise ProxyProtocolError("PROXY v2 IPv4 block too short")
        src, dst = socket.inet_ntop(socket.AF_INET, body[0:4]), socket.inet_ntop(socket.AF_INET, body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    elif family == 0x21:  # TCP over IPv6
        if length < 36:
            raise ProxyProtocolError("PROXY v2 IPv6 block too short")
        src = socket.inet_ntop(socket.AF_INET6, body[0:16])
        dst = socket.inet_ntop(socket.AF_INET6, body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    elif family == 0x00:  # UNSPEC
        return ProxyInfo(None, None)
    else:
        raise ProxyProtocolError(f"unsupported PROXY v2 address family 0x{family:02x}")
    return ProxyInfo((src, sport), (dst, dport))


def build_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    fam = "TCP6" if ipaddress.ip_address(src[0]).version == 6 else "TCP4"
    return f"PROXY {fam} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")


def build_v2(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version != d.version:
        d = ipaddress.ip_address("::") if s.version == 6 else ipaddress.ip_address("0.0.0.0")
    family = 0x21 if s.version == 6 else 0x11
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def _addr(ip: str, port: str, version: int) -> tuple[str, int]:
    try:
        addr = ipaddress.ip_address(ip)
        num = int(port)
    except ValueError:
        raise ProxyProtocolError(f"bad address {ip!r} port {port!r} in PROXY v1") from None
    if addr.version != version or not 0 <= num <= 65535 or not port.isdigit():
        raise ProxyProtocolError(f"bad address {ip!r} port {port!r} in PROXY v1")
    return str(addr), num
