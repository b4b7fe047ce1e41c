"""The node's chacha20-poly1305@openssh.com fast path (`internal.ssh.ciphers.FastChaCha`):
byte for byte asyncssh's own ChachaEncryption, and real OpenSSH and asyncssh clients moving
files through it, across rekeys."""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.encryption import ChachaEncryption, get_encryption

from internal.ssh import ciphers, libcrypto
from internal.ssh.ciphers import FastChaCha, wrap_cipher
from tests import sshutil
from tests.procs import SSH_OPTS
from tests.sshutil import NodeUnderTest, count_cipher_use, set_chacha_backend

sshnode = sshutil.sshnode   # the fixture

CHACHA = "chacha20-poly1305@openssh.com"


@pytest.fixture(autouse=True, params=["compiled", "cffi", "cryptography"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on each implementation under FastChaCha: the system's libcrypto,
    compiled (internal.ssh._aead) or through cffi (internal.ssh.libcrypto), one context per
    key, and the cryptography package."""
    set_chacha_backend(request.param, monkeypatch)
    return request.param


def _pair(key: bytes) -> tuple[Any, FastChaCha]:
    ref = get_encryption(CHACHA.encode(), key, b"")
    fast = wrap_cipher(ref)
    assert type(ref) is ChachaEncryption and type(fast) is FastChaCha
    return ref, fast


def test_libcrypto_is_used_where_the_system_has_it(backend: str) -> None:
    fast = _pair(os.urandom(64))[1]
    want = {"compiled": "internal.ssh._aead", "cffi": "internal.ssh.libcrypto",
            "cryptography": "NoneType"}[backend]
    assert type(fast._evp).__module__ == want or type(fast._evp).__name__ == want


def _packet(rng: random.Random, payload_len: int) -> tuple[bytes, bytes]:
    """(length field, padded packet) as asyncssh frames a packet for chacha (block 8, etm)."""
    padlen = -(1 + payload_len) % 8
    if padlen < 4:
        padlen += 8
    packet = bytes((padlen,)) + rng.randbytes(payload_len) + bytes(padlen)
    return len(packet).to_bytes(4, "big"), packet


# OpenSSH's channel packets reach 32 KiB + headers; sequence numbers wrap at 2**32
SIZES = [1, 3, 7, 8, 15, 16, 31, 55, 56, 63, 64, 65, 119, 120, 127, 128, 1000, 4096, 16384,
         32768 + 13, 32768 + 23, 65536 + 100]
SEQS = [0, 1, 2, 3, 255, 256, 65535, 2**31, 2**32 - 2, 2**32 - 1]


def _cases(seed: int):
    """(rng, asyncssh's cipher, ours, sequence number, length header, packet) over four keys,
    the edge sequence numbers plus random ones, and every size in SIZES."""
    rng = random.Random(seed)
    for _ in range(4):
        ref, fast = _pair(rng.randbytes(64))
        for seq in SEQS + [rng.randrange(2**32) for _ in range(20)]:
            for size in SIZES:
                yield (rng, ref, fast, seq, *_packet(rng, size))


def _cut(rng: random.Random, packet: bytes) -> list[Any]:
    """The packet in parts as the node's send path has them: bytes and memoryviews, runs of
    short ones (header fields) and long ones, cut anywhere within a ChaCha20 block."""
    parts: list[Any] = []
    pos = 0
    while pos < len(packet):
        n = rng.choice((0, 1, 2, 4, 5, 63, 64, 65, 255, 256, 257, 4000, 40000))
        part = packet[pos:pos + n]
        parts.append(memoryview(part) if rng.random() < 0.5 else part)
        pos += len(part)
    return parts


def test_encrypt_matches_asyncssh(backend: str) -> None:
    for rng, ref, fast, seq, hdr, packet in _cases(1):
        want = ref.encrypt_packet(seq, hdr, packet)
        assert fast.encrypt_packet(seq, hdr, packet) == want
        # sealed from its parts, the packet goes on the wire as asyncssh would send it
        wire = fast.seal(seq, hdr, _cut(rng, packet))
        assert b"".join(wire) == want[0] + want[1]
        assert len(wire) == (3 if backend == "cryptography" else 1)


def test_decrypt_matches_asyncssh_and_rejects_tampering() -> None:
    for rng, ref, fast, seq, hdr, packet in _cases(2):
        data, tag = ref.encrypt_packet(seq, hdr, packet)
        wire = data + tag
        n = len(data)
        # asyncssh's calling convention: 8 bytes, then the rest and the MAC as views
        view = memoryview(wire + rng.randbytes(rng.randrange(40)))   # next packet
        first, got_len = fast.decrypt_header(seq, bytes(view[:8]), 4)
        assert got_len == hdr == ref.decrypt_header(seq, wire[:8], 4)[1]
        assert fast.decrypt_packet(seq, first, view[8:n], 4, view[n:n + 16]) == packet
        # the node's receive path: `first` is the view over everything buffered
        first, got_len = fast.decrypt_header(seq, view, 4)
        assert got_len == hdr
        assert fast.decrypt_packet(seq, first, view[8:n], 4, view[n:n + 16]) == packet
        # ... and when the packet's end arrived in a later read (another buffer)
        if n > 9:
            cut = rng.randrange(9, n)
            later = memoryview(bytes(view[8:]))
            assert fast.decrypt_packet(seq, view[:cut], later[:n - 8], 4,
                                       later[n - 8:n + 8]) == packet
        assert ref.decrypt_packet(seq, wire[:8], wire[8:n], 4, tag) == packet
        # tampered tag, ciphertext, length field, or the wrong sequence number
        bad_tag = bytearray(tag)
        bad_tag[rng.randrange(16)] ^= 1 << rng.randrange(8)
        assert fast.decrypt_packet(seq, wire[:8], wire[8:n], 4, bytes(bad_tag)) is None
        bad = bytearray(wire)
        bad[rng.randrange(n)] ^= 1 << rng.randrange(8)
        bad_view = memoryview(bytes(bad))
        assert fast.decrypt_packet(seq, bad_view, bad_view[8:n], 4,
                                   bad_view[n:n + 16]) is None
        assert fast.decrypt_packet((seq + 1) & 0xFFFFFFFF, view, view[8:n], 4,
                                   view[n:n + 16]) is None


def test_both_directions_interoperate_with_asyncssh() -> None:
    """One key per direction as after a key exchange: our packets open with asyncssh's
    object and asyncssh's with ours, over a run of consecutive sequence numbers."""
    rng = random.Random(3)
    ref_out, fast_out = _pair(rng.randbytes(64))
    ref_in, fast_in = _pair(rng.randbytes(64))
    for seq in range(2**32 - 200, 2**32 + 200):
        seq &= 0xFFFFFFFF
        hdr, packet = _packet(rng, rng.choice(SIZES))
        data, tag = fast_out.encrypt_packet(seq, hdr, packet)
        assert ref_out.decrypt_header(seq, data[:8], 4)[1] == hdr
        assert ref_out.decrypt_packet(seq, data[:8], data[8:], 4, tag) == packet
        data, tag = ref_in.encrypt_packet(seq, hdr, packet)
        assert fast_in.decrypt_header(seq, data[:8], 4)[1] == hdr
        assert fast_in.decrypt_packet(seq, data[:8], data[8:], 4, tag) == packet
    # a key for one direction does not open the other's packets
    data, tag = ref_in.encrypt_packet(7, *_packet(rng, 100))
    assert fast_out.decrypt_packet(7, data[:8], data[8:], 4, tag) is None


def test_other_ciphers_are_not_taken() -> None:
    gcm = get_encryption(b"aes128-gcm@openssh.com", os.urandom(16), os.urandom(12))
    ctr = get_encryption(b"aes128-ctr", os.urandom(16), os.urandom(16),
                         b"hmac-sha2-256-etm@openssh.com", os.urandom(32), True)
    assert FastChaCha.wrap(gcm) is gcm and FastChaCha.wrap(ctr) is ctr
    assert type(wrap_cipher(gcm)) is ciphers.FastGCM
    assert type(wrap_cipher(ctr)) is ciphers.BytesIn


# -- real clients against a node ----------------------------------------------------------

@pytest.fixture
def chacha_keys(monkeypatch: pytest.MonkeyPatch) -> list[FastChaCha]:
    """Every FastChaCha the node makes, counting the packets it sealed and opened."""
    return count_cipher_use(FastChaCha, monkeypatch)


async def _sftp(node: NodeUnderTest, user: str, key: Path, commands: str,
                *extra: str) -> tuple[int, str]:
    args = ["sftp", "-v", "-b", "-", "-c", CHACHA, "-P", str(node.port), "-i", str(key),
            "-o", "IdentitiesOnly=yes", *SSH_OPTS, *extra, f"{user}@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(commands.encode()), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_openssh_sftp_chacha_round_trip(sshnode: NodeUnderTest, tmp_path: Path,
                                              chacha_keys: list[FastChaCha]) -> None:
    home, key = sshnode.keyed_user("alice")
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(3 << 20) + os.urandom(12345))   # not a multiple of anything
    rc, out = await _sftp(sshnode, "alice", key,
                          f"put {src} up.bin\nget up.bin {tmp_path / 'down.bin'}\n")
    assert rc == 0, out
    assert f"kex: client->server cipher: {CHACHA}" in out, out
    assert f"kex: server->client cipher: {CHACHA}" in out, out
    assert _digest(home / "up.bin") == _digest(src) == _digest(tmp_path / "down.bin")
    await sshnode.wait_idle()
    # one key each way, and the bulk went through the fast path (~100 32 KiB packets each way)
    assert len(chacha_keys) == 2
    assert sum(k.opened for k in chacha_keys) > 100
    assert sum(k.sealed for k in chacha_keys) > 100


async def test_openssh_sftp_chacha_across_rekeys(sshnode: NodeUnderTest, tmp_path: Path,
                                                 chacha_keys: list[FastChaCha]) -> None:
    home, key = sshnode.keyed_user("alice")
    src = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    src.write_bytes(b"".join(bytes([i]) + block[1:] for i in range(64)) + b"tail")
    rc, out = await _sftp(sshnode, "alice", key,
                          f"put {src} big.bin\nget big.bin {tmp_path / 'back.bin'}\n",
                          "-o", "RekeyLimit=16M")
    assert rc == 0, out
    assert _digest(home / "big.bin") == _digest(src) == _digest(tmp_path / "back.bin")
    # 128 MiB at 16M per key: the client rekeyed several times, each time to chacha again
    rekeys = len(re.findall(r"SSH2_MSG_NEWKEYS received", out))
    assert rekeys >= 5, out
    await sshnode.wait_idle()
    assert len(chacha_keys) == 2 * rekeys
    assert len({(k._main, k._len) for k in chacha_keys}) == len(chacha_keys)
    assert all(k.opened + k.sealed > 0 for k in chacha_keys)


async def test_asyncssh_client_chacha(sshnode: NodeUnderTest, tmp_path: Path,
                                      chacha_keys: list[FastChaCha]) -> None:
    """asyncssh as the client: its own ChachaEncryption on the other end, and a rekey by
    byte count from the client side."""
    home, key = sshnode.keyed_user("bob")
    data = os.urandom(5 << 20)
    (tmp_path / "a.bin").write_bytes(data)
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="bob",
                                client_keys=[str(key)], known_hosts=None,
                                encryption_algs=[CHACHA], rekey_bytes=2 << 20) as conn:
        assert conn.get_extra_info("send_cipher") == CHACHA
        async with conn.start_sftp_client() as sftp:
            await sftp.put(str(tmp_path / "a.bin"), "a.bin")
            await sftp.get("a.bin", str(tmp_path / "b.bin"))
    assert (home / "a.bin").read_bytes() == data == (tmp_path / "b.bin").read_bytes()
    await sshnode.wait_idle()
    assert len(chacha_keys) >= 6   # the first key exchange and at least two rekeys


def test_a_libcrypto_that_refuses_the_key_leaves_the_cryptography_path(
        backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend != "cffi":
        pytest.skip("cffi variant only")

    def refuse(self: Any, key: bytes) -> Any:
        raise OSError("EVP_EncryptInit_ex(chacha20) failed")

    monkeypatch.setattr(libcrypto._Lib, "cipher", refuse)
    ref, fast = _pair(os.urandom(64))
    assert fast._evp is None
    hdr, packet = _packet(random.Random(9), 100)
    assert fast.encrypt_packet(5, hdr, packet) == ref.encrypt_packet(5, hdr, packet)


def test_compiled_refuses_what_does_not_fit(backend: str) -> None:
    """The compiled module writes into buffers it sized itself: anything that does not fit
    them is an error, never a write past their end."""
    if backend != "compiled":
        pytest.skip("compiled variant only")
    from internal.ssh._aead import ChaChaPoly
    with pytest.raises(ValueError):
        ChaChaPoly(bytes(31), bytes(32))
    box = ChaChaPoly(os.urandom(32), os.urandom(32))
    hdr, packet = _packet(random.Random(11), 100)
    with pytest.raises(ValueError):
        box.seal(1, b"\0\0\0\0\0", [packet])      # a length field is 4 bytes
    # a part whose len() counts items, not bytes: its buffer is longer than the room made
    with pytest.raises(ValueError):
        box.seal(1, hdr, [memoryview(bytes(64)).cast("I")])
    with pytest.raises(ValueError):
        box.length(1, b"\0\0\0")
    wire = box.seal(2, hdr, [packet])
    assert box.open(2, wire[:-16], 4, wire[-16:]) == packet
    assert box.open(2, wire[:-16], 4, wire[-15:]) is None     # a short tag never matches
    with pytest.raises(ValueError):
        box.open(2, wire[:3], 4, wire[-16:])
    with pytest.raises(TypeError):
        box.seal(1, hdr, [packet, "text"])
