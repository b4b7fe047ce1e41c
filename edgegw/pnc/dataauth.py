"""Proving a Data connection: which offer (or which node's pool) a raw TCP connection serves.

The Data port has no TLS (the SSH inside is encrypted already), so authenticity comes from an
HMAC over a fresh gateway nonce, keyed by a secret that only ever travelled inside the PNC's TLS:

    gateway -> node   challenge   b"EGWD" + version(1) + nonce(32)                 37 bytes
    node -> gateway   proof       kind(1) + ident(u64 big-endian) + mac(32)        41 bytes
  pooled connections only, when the gateway hands one a client:
    gateway -> node   assignment  b"EGWA" + session_id(u64) + client ip(16)
                                  + client port(u16) + mac(16)                     46 bytes
    node -> gateway   answer      ANSWER_ACCEPT, ANSWER_RETRY or ANSWER_REFUSE      1 byte

kind 1 (session): ident = session id, mac = HMAC-SHA256(offer secret, b"edgegw-data-v1" + nonce
+ ident). kind 2 (pool): an idle connection owned by one PNC peer; ident is the node's choice,
mac = HMAC-SHA256(pool key, b"edgegw-pool-v1" + nonce + ident).

An assignment carries the client's address itself, so a pooled session starts without a PNC
round trip. Its mac, HMAC-SHA256(pool key, b"edgegw-assign-v1" + nonce + ident + the 30 bytes
before it) cut to 16 bytes, binds it to this connection's nonce: the address the node's IP rules
see cannot be forged or replayed by anything on the Data path that lacks the pool key. The client
ip is IPv6, or IPv4-mapped IPv6. Every layout is fixed-size, so a reader knows how much to wait
for. Sans-IO: the drivers move the bytes.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import struct
from typing import NamedTuple

from edgegw.pnc.errors import LocalProtocolError, RemoteProtocolError

DATA_VERSION = 2
CHALLENGE_MAGIC = b"EGWD"
ASSIGN_MAGIC = b"EGWA"
NONCE_LEN = 32
KEY_LEN = 32
MAC_LEN = 32
KIND_SESSION = 1
KIND_POOL = 2
ANSWER_ACCEPT = 1   # the node serves the session on this connection
ANSWER_RETRY = 2    # declined (capacity, draining): another node may take the client
ANSWER_REFUSE = 3   # refused (banned, no user may connect from there): close the client
ASSIGN_MAC_LEN = 16

_SESSION_LABEL = b"edgegw-data-v1"
_POOL_LABEL = b"edgegw-pool-v1"
_ASSIGN_LABEL = b"edgegw-assign-v1"
_PROOF = struct.Struct(f">BQ{MAC_LEN}s")
_ASSIGN_BODY = struct.Struct(">4sQ16sH")
_U64 = struct.Struct(">Q")
_U64_MAX = 2**64 - 1

CHALLENGE_LEN = len(CHALLENGE_MAGIC) + 1 + NONCE_LEN   # 37
PROOF_LEN = _PROOF.size                                 # 41
ASSIGN_LEN = _ASSIGN_BODY.size + ASSIGN_MAC_LEN         # 46


class Assignment(NamedTuple):
    session_id: int
    client_ip: str
    client_port: int


class Proof(NamedTuple):
    kind: int      # KIND_SESSION or KIND_POOL
    ident: int     # session id, or the node's pool connection id
    mac: bytes


def _need(what: str, value: bytes, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        got = len(value) if isinstance(value, bytes) else type(value).__name__
        raise LocalProtocolError(f"{what} must be exactly {length} bytes, got {got}")


def _need_u64(what: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= _U64_MAX:
        raise LocalProtocolError(f"{what} must be an int in {low}..{_U64_MAX}, got {value!r}")


def _mac(key: bytes, label: bytes, nonce: bytes, ident: int) -> bytes:
    return hmac.digest(key, label + nonce + _U64.pack(ident), hashlib.sha256)


def make_challenge() -> tuple[bytes, bytes]:
    """(nonce, wire): a fresh nonce per connection, so a recorded proof never replays."""
    nonce = secrets.token_bytes(NONCE_LEN)
    return nonce, CHALLENGE_MAGIC + bytes((DATA_VERSION,)) + nonce


def parse_challenge(wire: bytes) -> bytes:
    """The nonce in a gateway's challenge; RemoteProtocolError if it is not one we understand."""
    if len(wire) != CHALLENGE_LEN:
        raise RemoteProtocolError(
            f"Data challenge is {len(wire)} bytes, expected {CHALLENGE_LEN}")
    if wire[:4] != CHALLENGE_MAGIC:
        raise RemoteProtocolError(
            f"Data challenge starts with {bytes(wire[:4])!r}, not {CHALLENGE_MAGIC!r}: "
            "is this the gateway's Data port?")
    if wire[4] != DATA_VERSION:
        raise RemoteProtocolError(
            f"Data challenge version {wire[4]}, this side speaks {DATA_VERSION}; "
            "upgrade the older side")
    return bytes(wire[5:])


def session_proof(secret: bytes, session_id: int, nonce: bytes) -> bytes:
    """The node's answer for a Data connection dialed for one offer."""
    _need("offer secret", secret, KEY_LEN)
    _need("nonce", nonce, NONCE_LEN)
    _need_u64("session_id", session_id, 1)
    return _PROOF.pack(KIND_SESSION, session_id, _mac(secret, _SESSION_LABEL, nonce, session_id))


def pool_proof(pool_key: bytes, ident: int, nonce: bytes) -> bytes:
    """The node's answer for a pre-opened (pooled) Data connection."""
    _need("pool_key", pool_key, KEY_LEN)
    _need("nonce", nonce, NONCE_LEN)
    _need_u64("pool ident", ident, 0)
    return _PROOF.pack(KIND_POOL, ident, _mac(pool_key, _POOL_LABEL, nonce, ident))


def parse_proof(wire: bytes) -> Proof:
    """Split a proof; RemoteProtocolError on a wrong length, an unknown kind or session id 0."""
    if len(wire) != PROOF_LEN:
        raise RemoteProtocolError(f"Data proof is {len(wire)} bytes, expected {PROOF_LEN}")
    kind, ident, mac = _PROOF.unpack(wire)
    if kind not in (KIND_SESSION, KIND_POOL):
        raise RemoteProtocolError(f"unknown Data proof kind {kind}")
    if kind == KIND_SESSION and ident == 0:
        raise RemoteProtocolError("Data proof names session 0, which never exists")
    return Proof(kind, ident, mac)


def _verify(proof: Proof, kind: int, key: bytes, label: bytes, nonce: bytes) -> bool:
    _need("key", key, KEY_LEN)
    _need("nonce", nonce, NONCE_LEN)
    if proof.kind != kind or not isinstance(proof.mac, bytes):
        return False
    if not isinstance(proof.ident, int) or not 0 <= proof.ident <= _U64_MAX:
        return False
    return hmac.compare_digest(_mac(key, label, nonce, proof.ident), proof.mac)


def verify_session_proof(proof: Proof, secret: bytes, nonce: bytes) -> bool:
    """True if `proof` was made with this offer's secret over this nonce (constant time)."""
    return _verify(proof, KIND_SESSION, secret, _SESSION_LABEL, nonce)


def verify_pool_proof(proof: Proof, pool_key: bytes, nonce: bytes) -> bool:
    """True if `proof` was made with this peer's pool key over this nonce (constant time)."""
    return _verify(proof, KIND_POOL, pool_key, _POOL_LABEL, nonce)


def _assign_mac(pool_key: bytes, nonce: bytes, ident: int, body: bytes) -> bytes:
    return hmac.digest(pool_key, _ASSIGN_LABEL + nonce + _U64.pack(ident) + body,
                       hashlib.sha256)[:ASSIGN_MAC_LEN]


def encode_assignment(assignment: Assignment, pool_key: bytes, nonce: bytes,
                      ident: int) -> bytes:
    """What the gateway writes on the pooled connection (`nonce`, `ident`) it gives a client."""
    session_id, client_ip, client_port = assignment
    _need_u64("session_id", session_id, 1)
    _need("pool_key", pool_key, KEY_LEN)
    _need("nonce", nonce, NONCE_LEN)
    _need_u64("pool ident", ident, 0)
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError as exc:
        raise LocalProtocolError(f"client_ip: {exc}") from None
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    if not isinstance(client_port, int) or isinstance(client_port, bool) \
            or not 0 <= client_port <= 65535:
        raise LocalProtocolError(f"client_port must be 0..65535, got {client_port!r}")
    body = _ASSIGN_BODY.pack(ASSIGN_MAGIC, session_id, ip.packed, client_port)
    return body + _assign_mac(pool_key, nonce, ident, body)


def parse_assignment(wire: bytes, pool_key: bytes, nonce: bytes, ident: int) -> Assignment:
    """The client a pooled connection now carries; RemoteProtocolError if malformed or forged."""
    _need("pool_key", pool_key, KEY_LEN)
    _need("nonce", nonce, NONCE_LEN)
    if len(wire) != ASSIGN_LEN:
        raise RemoteProtocolError(f"Data assignment is {len(wire)} bytes, expected {ASSIGN_LEN}")
    body, mac = bytes(wire[:_ASSIGN_BODY.size]), bytes(wire[_ASSIGN_BODY.size:])
    magic, session_id, packed_ip, port = _ASSIGN_BODY.unpack(body)
    if magic != ASSIGN_MAGIC:
        raise RemoteProtocolError(f"Data assignment starts with {magic!r}, not {ASSIGN_MAGIC!r}")
    if not hmac.compare_digest(_assign_mac(pool_key, nonce, ident, body), mac):
        raise RemoteProtocolError("Data assignment has a wrong mac (not from this link's "
                                  "gateway, or meant for another connection)")
    if session_id == 0:
        raise RemoteProtocolError("Data assignment names session 0, which never exists")
    ip = ipaddress.IPv6Address(packed_ip)
    return Assignment(int(session_id), str(ip.ipv4_mapped or ip), int(port))


def parse_answer(byte: bytes) -> int:
    """The node's one-byte answer to an assignment; RemoteProtocolError for anything else."""
    if len(byte) != 1 or byte[0] not in (ANSWER_ACCEPT, ANSWER_RETRY, ANSWER_REFUSE):
        raise RemoteProtocolError(f"Data assignment answer {bytes(byte)!r} is not one we know")
    return byte[0]


__all__ = [
    "ANSWER_ACCEPT", "ANSWER_REFUSE", "ANSWER_RETRY", "ASSIGN_LEN", "Assignment",
    "CHALLENGE_LEN", "DATA_VERSION", "KIND_POOL", "KIND_SESSION", "PROOF_LEN", "Proof",
    "encode_assignment", "make_challenge", "parse_answer", "parse_assignment",
    "parse_challenge", "parse_proof", "pool_proof", "session_proof", "verify_pool_proof",
    "verify_session_proof",
]
