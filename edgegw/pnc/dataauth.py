"""Proving a Data connection: which offer (or which node's pool) a raw TCP connection serves.

The Data port has no TLS (the SSH inside is encrypted already), so authenticity comes from an
HMAC over a fresh gateway nonce, keyed by a secret that only ever travelled inside the PNC's TLS:

    gateway -> node   challenge   b"EGWD" + version(1) + nonce(32)                 37 bytes
    node -> gateway   proof       kind(1) + ident(u64 big-endian) + mac(32)        41 bytes
    gateway -> node   assignment  b"EGWA" + session_id(u64)    (pooled only)       12 bytes

kind 1 (session): ident = session id, mac = HMAC-SHA256(offer secret, b"edgegw-data-v1" + nonce
+ ident). kind 2 (pool): an idle connection owned by one PNC peer; ident is the node's choice,
mac = HMAC-SHA256(pool key, b"edgegw-pool-v1" + nonce + ident). Both layouts are fixed-size, so
a reader knows how much to wait for. Sans-IO: the drivers move the bytes.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import NamedTuple

from edgegw.pnc.errors import LocalProtocolError, RemoteProtocolError

DATA_VERSION = 1
CHALLENGE_MAGIC = b"EGWD"
ASSIGN_MAGIC = b"EGWA"
NONCE_LEN = 32
KEY_LEN = 32
MAC_LEN = 32
KIND_SESSION = 1
KIND_POOL = 2

_SESSION_LABEL = b"edgegw-data-v1"
_POOL_LABEL = b"edgegw-pool-v1"
_PROOF = struct.Struct(f">BQ{MAC_LEN}s")
_ASSIGN = struct.Struct(">4sQ")
_U64 = struct.Struct(">Q")
_U64_MAX = 2**64 - 1

CHALLENGE_LEN = len(CHALLENGE_MAGIC) + 1 + NONCE_LEN   # 37
PROOF_LEN = _PROOF.size                                 # 41
ASSIGN_LEN = _ASSIGN.size                               # 12


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


def encode_assignment(session_id: int) -> bytes:
    """What the gateway writes on a pooled connection before relaying a session over it."""
    _need_u64("session_id", session_id, 1)
    return _ASSIGN.pack(ASSIGN_MAGIC, session_id)


def parse_assignment(wire: bytes) -> int:
    """The session id a pooled connection now carries; RemoteProtocolError if malformed."""
    if len(wire) != ASSIGN_LEN:
        raise RemoteProtocolError(f"Data assignment is {len(wire)} bytes, expected {ASSIGN_LEN}")
    magic, session_id = _ASSIGN.unpack(wire)
    if magic != ASSIGN_MAGIC:
        raise RemoteProtocolError(f"Data assignment starts with {magic!r}, not {ASSIGN_MAGIC!r}")
    if session_id == 0:
        raise RemoteProtocolError("Data assignment names session 0, which never exists")
    return int(session_id)


__all__ = [
    "ASSIGN_LEN", "CHALLENGE_LEN", "DATA_VERSION", "KIND_POOL", "KIND_SESSION", "PROOF_LEN",
    "Proof", "encode_assignment", "make_challenge", "parse_assignment", "parse_challenge",
    "parse_proof", "pool_proof", "session_proof", "verify_pool_proof", "verify_session_proof",
]
