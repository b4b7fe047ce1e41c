"""Data-connection proofs: the right proof passes, anything else fails, in constant time."""
from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegw.pnc import LocalProtocolError, RemoteProtocolError, dataauth
from edgegw.pnc.dataauth import (
    ANSWER_ACCEPT, ANSWER_REFUSE, ANSWER_RETRY, ASSIGN_LEN, CHALLENGE_LEN, KIND_POOL,
    KIND_SESSION, PROOF_LEN, Assignment, Proof, encode_assignment, make_challenge, parse_answer,
    parse_assignment, parse_challenge, parse_proof, pool_proof, session_proof, verify_pool_proof,
    verify_session_proof,
)

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
SID = 0x1122334455667788
NONCE = bytes(range(100, 132))


def test_sizes() -> None:
    assert (CHALLENGE_LEN, PROOF_LEN, ASSIGN_LEN) == (37, 41, 46)


def test_challenge_round_trip_and_fresh_nonces() -> None:
    nonce, wire = make_challenge()
    assert len(wire) == CHALLENGE_LEN and wire.startswith(b"EGWD\x02")
    assert parse_challenge(wire) == nonce and len(nonce) == 32
    assert make_challenge()[0] != nonce


@pytest.mark.parametrize("wire,why", [
    (b"EGWD\x02" + b"n" * 31, "expected 37"),
    (b"EGWD\x02" + b"n" * 33, "expected 37"),
    (b"SSH-\x02" + b"n" * 32, "Data port"),
    (b"EGWD\x01" + b"n" * 32, "version 1"),
])
def test_bad_challenge(wire: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        parse_challenge(wire)


def test_session_proof_accepted() -> None:
    nonce, wire = make_challenge()
    raw = session_proof(SECRET, SID, parse_challenge(wire))
    assert len(raw) == PROOF_LEN
    proof = parse_proof(raw)
    assert proof == Proof(KIND_SESSION, SID, proof.mac)
    assert verify_session_proof(proof, SECRET, nonce)
    # the documented construction, independently
    expected = hmac.new(SECRET, b"edgegw-data-v1" + nonce + struct.pack(">Q", SID),
                        hashlib.sha256).digest()
    assert raw == bytes([1]) + struct.pack(">Q", SID) + expected


def test_pool_proof_accepted() -> None:
    nonce, _ = make_challenge()
    proof = parse_proof(pool_proof(SECRET, 0, nonce))
    assert proof.kind == KIND_POOL and proof.ident == 0
    assert verify_pool_proof(proof, SECRET, nonce)
    expected = hmac.new(SECRET, b"edgegw-pool-v1" + nonce + bytes(8), hashlib.sha256).digest()
    assert proof.mac == expected


def test_wrong_secret_nonce_ident_or_kind_rejected() -> None:
    nonce, _ = make_challenge()
    other_nonce, _ = make_challenge()
    proof = parse_proof(session_proof(SECRET, SID, nonce))
    assert not verify_session_proof(proof, OTHER, nonce)
    assert not verify_session_proof(proof, SECRET, other_nonce)
    assert not verify_session_proof(proof._replace(ident=SID + 1), SECRET, nonce)
    flipped = proof.mac[:-1] + bytes((proof.mac[-1] ^ 1,))   # always a different MAC
    assert not verify_session_proof(proof._replace(mac=flipped), SECRET, nonce)
    assert not verify_session_proof(proof._replace(mac=proof.mac[:31]), SECRET, nonce)
    # same key, same ident: a pool proof never passes as a session proof, nor the reverse
    pooled = parse_proof(pool_proof(SECRET, SID, nonce))
    assert not verify_session_proof(pooled, SECRET, nonce)
    assert not verify_session_proof(pooled._replace(kind=KIND_SESSION), SECRET, nonce)
    assert not verify_pool_proof(proof, SECRET, nonce)
    assert not verify_pool_proof(proof._replace(kind=KIND_POOL), SECRET, nonce)
    assert not verify_pool_proof(pooled, OTHER, nonce)


@pytest.mark.parametrize("raw,why", [
    (b"\x01" + bytes(8 + 31), "expected 41"),
    (b"\x01" + bytes(8 + 33), "expected 41"),
    (b"", "expected 41"),
    (b"\x03" + b"\x01" * 40, "kind 3"),
    (b"\x00" + b"\x01" * 40, "kind 0"),
    (b"\x01" + bytes(8) + bytes(32), "session 0"),
])
def test_bad_proof_shapes(raw: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        parse_proof(raw)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=60))
def test_any_proof_bytes_parse_or_remote_error(raw: bytes) -> None:
    nonce = bytes(32)
    try:
        proof = parse_proof(raw)
    except RemoteProtocolError:
        return
    assert not verify_session_proof(proof, SECRET, nonce)
    assert not verify_pool_proof(proof, SECRET, nonce)


def test_compare_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(dataauth.hmac, "compare_digest", spy)
    nonce, _ = make_challenge()
    assert verify_session_proof(parse_proof(session_proof(SECRET, SID, nonce)), SECRET, nonce)
    assert not verify_pool_proof(parse_proof(pool_proof(SECRET, 5, nonce)), OTHER, nonce)
    assert len(calls) == 2


@pytest.mark.parametrize("call", [
    lambda: session_proof(SECRET[:31], SID, bytes(32)),
    lambda: session_proof(SECRET, 0, bytes(32)),
    lambda: session_proof(SECRET, 2**64, bytes(32)),
    lambda: session_proof(SECRET, SID, bytes(31)),
    lambda: pool_proof(SECRET, -1, bytes(32)),
    lambda: pool_proof("k" * 32, 1, bytes(32)),
    lambda: verify_session_proof(Proof(1, 1, bytes(32)), SECRET, bytes(5)),
    lambda: encode_assignment(Assignment(0, "1.2.3.4", 1), SECRET, NONCE, 1),
    lambda: encode_assignment(Assignment(True, "1.2.3.4", 1), SECRET, NONCE, 1),
    lambda: encode_assignment(Assignment(SID, "1.2.3", 1), SECRET, NONCE, 1),
    lambda: encode_assignment(Assignment(SID, "1.2.3.4", 65536), SECRET, NONCE, 1),
    lambda: encode_assignment(Assignment(SID, "1.2.3.4", 1), SECRET[:31], NONCE, 1),
    lambda: encode_assignment(Assignment(SID, "1.2.3.4", 1), SECRET, NONCE, -1),
])
def test_misuse_is_a_local_error(call: object) -> None:
    with pytest.raises(LocalProtocolError):
        call()  # type: ignore[operator]


@pytest.mark.parametrize("ip,seen", [("203.0.113.9", "203.0.113.9"),
                                     ("2001:db8::7", "2001:db8::7"), ("::", "::"),
                                     ("::ffff:198.51.100.2", "198.51.100.2")])
def test_assignment_round_trip(ip: str, seen: str) -> None:
    wire = encode_assignment(Assignment(SID, ip, 40000), SECRET, NONCE, 7)
    assert len(wire) == ASSIGN_LEN and wire.startswith(b"EGWA" + struct.pack(">Q", SID))
    assert parse_assignment(wire, SECRET, NONCE, 7) == Assignment(SID, seen, 40000)
    assert parse_assignment(bytearray(wire), SECRET, NONCE, 7) == Assignment(SID, seen, 40000)


def _forged_sid0() -> bytes:
    body = b"EGWA" + bytes(8) + bytes(16) + b"\x00\x01"
    mac = hmac.digest(SECRET, b"edgegw-assign-v1" + NONCE + struct.pack(">Q", 7) + body,
                      hashlib.sha256)[:16]
    return body + mac


GOOD = encode_assignment(Assignment(SID, "10.1.2.3", 22), SECRET, NONCE, 7)


@pytest.mark.parametrize("wire,key,nonce,ident,why", [
    (GOOD[:-1], SECRET, NONCE, 7, "expected 46"),
    (GOOD + b"x", SECRET, NONCE, 7, "expected 46"),
    (b"EGWD" + GOOD[4:], SECRET, NONCE, 7, "not b'EGWA'"),
    (GOOD, OTHER, NONCE, 7, "wrong mac"),            # another link's key
    (GOOD, SECRET, bytes(32), 7, "wrong mac"),       # replayed onto another connection
    (GOOD, SECRET, NONCE, 8, "wrong mac"),
    (GOOD[:12] + b"\x01" + GOOD[13:], SECRET, NONCE, 7, "wrong mac"),  # client ip rewritten
    (_forged_sid0(), SECRET, NONCE, 7, "session 0"),
])
def test_bad_assignment(wire: bytes, key: bytes, nonce: bytes, ident: int, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        parse_assignment(wire, key, nonce, ident)


def test_answers() -> None:
    for code in (ANSWER_ACCEPT, ANSWER_RETRY, ANSWER_REFUSE):
        assert parse_answer(bytes((code,))) == code
    for bad in (b"", b"\x00", b"\x04", b"SS", b"S"):
        with pytest.raises(RemoteProtocolError, match="answer"):
            parse_answer(bad)
