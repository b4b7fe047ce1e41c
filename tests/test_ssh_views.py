"""What the node's receive path hands on as views instead of copies: decrypted channel data
(`internal.ssh.ciphers`), and the data of an SFTP write request (`internal.ssh.streams`)."""
from __future__ import annotations

import os
from typing import Any

import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_REQUEST
from asyncssh.encryption import get_encryption
from asyncssh.packet import UInt32, UInt64

from internal.ssh.ciphers import FastChaCha, FastGCM, wrap_cipher
from internal.ssh.streams import _WritePacket
from tests.sshutil import set_chacha_backend


@pytest.fixture(params=["gcm", "chacha-compiled", "chacha-cffi", "chacha-cryptography"])
def pair(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(asyncssh's encryption object, the node's fast twin) for each fast implementation."""
    if request.param == "gcm":
        ref = get_encryption(b"aes128-gcm@openssh.com", os.urandom(16), os.urandom(12))
        fast = wrap_cipher(get_encryption(b"aes128-gcm@openssh.com", ref._cipher._key,
                                          ref._cipher._iv))
        assert type(fast) is FastGCM
        return ref, fast
    set_chacha_backend(request.param.removeprefix("chacha-"), monkeypatch)
    key = os.urandom(64)
    ref = get_encryption(b"chacha20-poly1305@openssh.com", key, b"")
    fast = wrap_cipher(get_encryption(b"chacha20-poly1305@openssh.com", key, b""))
    assert type(fast) is FastChaCha
    assert (fast._evp is None) == (request.param == "chacha-cryptography")
    return ref, fast


def _seal(ref: Any, fast: Any, seq: int, pkttype: int, payload: bytes
          ) -> tuple[bytes, bytes, int]:
    """A packet sealed by asyncssh's cipher: (plaintext, wire bytes, length before the tag)."""
    block = 16 if type(fast) is FastGCM else 8
    padlen = -(1 + 1 + len(payload)) % block
    padlen += block if padlen < 4 else 0
    packet = bytes((padlen, pkttype)) + payload + os.urandom(padlen)
    data, mac = ref.encrypt_packet(seq, len(packet).to_bytes(4, "big"), packet)
    return packet, data + mac, len(data)


def _open(fast: Any, seq: int, wire: bytes, n: int) -> Any:
    """Open it as the node's receive path does: `first` is a view over the whole read."""
    view = memoryview(wire)
    first, _ = fast.decrypt_header(seq, view, 4)
    return fast.decrypt_packet(seq, first, view[fast.FIRST:n], 4, view[n:])


@pytest.mark.parametrize("size", [1, 100, 32768])
def test_channel_data_comes_out_as_a_view_and_the_rest_as_bytes(pair: tuple[Any, Any],
                                                                size: int) -> None:
    ref, fast = pair
    body = UInt32(7) + UInt32(size) + os.urandom(size)
    for seq, pkttype in ((0, MSG_CHANNEL_DATA), (1, MSG_CHANNEL_REQUEST),
                         (2, MSG_CHANNEL_DATA)):
        packet, wire, n = _seal(ref, fast, seq, pkttype, body)
        plain = _open(fast, seq, wire, n)
        assert plain == packet
        if pkttype == MSG_CHANNEL_DATA:
            assert type(plain) is memoryview
            # asyncssh's own slicing then gives the channel its data without a copy
            payload = plain[1:-plain[0]]
            assert type(payload[9:]) is memoryview and payload[9:] == body[8:]
        else:   # asyncssh decodes strings out of these
            assert type(plain) is bytes


def test_a_tampered_channel_data_packet_is_still_refused(pair: tuple[Any, Any]) -> None:
    ref, fast = pair
    _, wire, n = _seal(ref, fast, 0, MSG_CHANNEL_DATA, UInt32(0) + UInt32(3) + b"abc")
    for pos in (n - 1, len(wire) - 1):   # ciphertext, tag
        bad = bytearray(wire)
        bad[pos] ^= 1
        assert _open(fast, 0, bytes(bad), n) is None


def test_write_request_data_is_a_view_and_its_handle_bytes() -> None:
    data = os.urandom(40000)
    request = (bytes((6,)) + UInt32(9) + UInt32(4) + b"\x00\x01\x02\x03" + UInt64(1 << 33) +
               UInt32(len(data)) + data)
    packet = _WritePacket(request)
    assert (packet.get_byte(), packet.get_uint32()) == (6, 9)
    handle = packet.get_string()
    # a dict key: hashing a view would hash the whole request under it first
    assert type(handle) is bytes and {b"\x00\x01\x02\x03": 1}[handle] == 1
    assert packet.get_uint64() == 1 << 33
    got = packet.get_string()
    assert type(got) is memoryview and got == data
    packet.check_end()
    # a short write's data is a short string: bytes
    small = _WritePacket(bytes((6,)) + UInt32(1) + UInt32(1) + b"h" + UInt64(0) +
                         UInt32(5) + b"hello")
    small.get_byte(), small.get_uint32(), small.get_string(), small.get_uint64()
    assert small.get_string() == b"hello"
