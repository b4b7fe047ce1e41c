"""The node's aes*-gcm@openssh.com fast path (`internal.ssh.ciphers.FastGCM`): byte for byte
asyncssh's own GCMEncryption across the nonce counter's wrap, packets sealed from their parts,
tampering refused, and real OpenSSH clients moving files through it with both key sizes,
across rekeys."""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from asyncssh.encryption import GCMEncryption, get_encryption

from internal.ssh.ciphers import FastGCM, wrap_cipher
from tests import sshutil
from tests.procs import SSH_OPTS
from tests.sshutil import NodeUnderTest, count_cipher_use

sshnode = sshutil.sshnode   # the fixture

ALGS = {16: "aes128-gcm@openssh.com", 32: "aes256-gcm@openssh.com"}
# channel packets reach 32 KiB + headers; a packet is a whole number of AES blocks
SIZES = [1, 11, 12, 27, 28, 100, 1000, 4096, 16384, 32768 + 13, 65536 + 100]
# the invocation counter (the IV's last 8 bytes) from 0, from the middle, and about to wrap
COUNTERS = [0, 1, 255, 2**32 - 1, 2**63, 2**64 - 3]


def _pair(key: bytes, iv: bytes) -> tuple[Any, FastGCM]:
    """asyncssh's cipher and ours for one direction, from the same key and initial IV (each
    keeps its own counter)."""
    ref = get_encryption(ALGS[len(key)].encode(), key, iv)
    fast = wrap_cipher(get_encryption(ALGS[len(key)].encode(), key, iv))
    assert type(ref) is GCMEncryption and type(fast) is FastGCM
    return ref, fast


def _packet(rng: random.Random, payload_len: int) -> tuple[bytes, bytes]:
    """(length field, padded packet) as SSH frames a packet for AES-GCM (block 16, the length
    not encrypted)."""
    padlen = -(1 + payload_len) % 16
    if padlen < 4:
        padlen += 16
    packet = bytes((padlen,)) + rng.randbytes(payload_len) + bytes(padlen)
    return len(packet).to_bytes(4, "big"), packet


def _streams(seed: int) -> Iterator[tuple[random.Random, Any, FastGCM]]:
    """(rng, asyncssh's cipher, ours) for both key sizes and every starting counter."""
    rng = random.Random(seed)
    for size in ALGS:
        for counter in COUNTERS:
            iv = rng.randbytes(4) + counter.to_bytes(8, "big")
            yield (rng, *_pair(rng.randbytes(size), iv))


def _cut(rng: random.Random, packet: bytes) -> list[Any]:
    """The packet in parts as the node's send path has them: bytes and memoryviews, short and
    long, cut anywhere within an AES block."""
    parts: list[Any] = []
    pos = 0
    while pos < len(packet):
        n = rng.choice((0, 1, 2, 15, 16, 17, 255, 256, 4000, 40000))
        part = packet[pos:pos + n]
        parts.append(memoryview(part) if rng.random() < 0.5 else part)
        pos += len(part)
    return parts


def test_encrypt_matches_asyncssh_across_the_counter() -> None:
    for rng, ref, fast in _streams(1):
        for _ in range(2):
            for size in SIZES:
                hdr, packet = _packet(rng, size)
                want = ref.encrypt_packet(0, hdr, packet)
                if rng.random() < 0.5:
                    assert fast.encrypt_packet(0, hdr, packet) == want
                else:   # sealed from its parts, as asyncssh would send it
                    wire = fast.seal(0, hdr, _cut(rng, packet))
                    assert b"".join(wire) == want[0] + want[1]


def test_decrypt_matches_asyncssh() -> None:
    for rng, ref, fast in _streams(2):
        for size in SIZES * 2:
            hdr, packet = _packet(rng, size)
            data, tag = ref.encrypt_packet(0, hdr, packet)
            wire = data + tag
            n = len(data)
            view = memoryview(wire + rng.randbytes(rng.randrange(40)))   # next packet
            how = rng.randrange(3)
            if how == 0:   # asyncssh's calling convention: the first block, then the rest
                first, got_len = fast.decrypt_header(0, bytes(view[:16]), 4)
            else:          # the node's receive path: a view over everything buffered
                first, got_len = fast.decrypt_header(0, view, 4)
            assert got_len == hdr
            if how == 2 and n > 17:   # ... with the packet's end in a later read
                cut = rng.randrange(17, n)
                later = memoryview(bytes(view[16:]))
                got = fast.decrypt_packet(0, view[:cut], later[:n - 16], 4,
                                          later[n - 16:n])
            else:
                got = fast.decrypt_packet(0, first, view[16:n], 4, view[n:n + 16])
            assert got == packet


@pytest.mark.parametrize("what", ["tag", "ciphertext", "length", "counter", "short tag"])
def test_tampering_is_refused(what: str) -> None:
    rng = random.Random(what)
    for size in (1, 100, 32768 + 13):
        key, iv = rng.randbytes(16), rng.randbytes(12)
        ref, fast = _pair(key, iv)
        if what == "counter":   # a packet replayed or skipped: the nonce no longer matches
            ref.encrypt_packet(0, *_packet(rng, 10))
        hdr, packet = _packet(rng, size)
        bad = bytearray(b"".join(ref.encrypt_packet(0, hdr, packet)))
        n = len(bad) - 16
        pos = {"tag": rng.randrange(n, n + 16), "ciphertext": rng.randrange(16, n),
               "length": rng.randrange(4)}.get(what)
        if pos is not None:
            bad[pos] ^= 1 << rng.randrange(8)
        view = memoryview(bytes(bad))
        mac = view[n + 1:] if what == "short tag" else view[n:]
        assert fast.decrypt_packet(0, view, view[16:n], 4, mac) is None


def test_both_directions_interoperate_with_asyncssh() -> None:
    """One key per direction as after a key exchange: our packets open with asyncssh's
    object and asyncssh's with ours, over a run of consecutive packets, the counter wrapping."""
    rng = random.Random(3)
    iv_out = rng.randbytes(4) + (2**64 - 100).to_bytes(8, "big")
    key_out, key_in, iv_in = rng.randbytes(32), rng.randbytes(16), rng.randbytes(12)
    (ref_out, fast_out), (ref_in, fast_in) = _pair(key_out, iv_out), _pair(key_in, iv_in)
    for _ in range(300):
        hdr, packet = _packet(rng, rng.choice(SIZES))
        data, tag = fast_out.encrypt_packet(0, hdr, packet)
        assert ref_out.decrypt_packet(0, data[:16], data[16:], 4, tag) == packet
        data, tag = ref_in.encrypt_packet(0, hdr, packet)
        assert fast_in.decrypt_packet(0, data[:16], data[16:], 4, tag) == packet
    # a key for one direction does not open the other's packets
    data, tag = ref_in.encrypt_packet(0, *_packet(rng, 100))
    assert fast_out.decrypt_packet(0, data[:16], data[16:], 4, tag) is None


# -- real clients against a node ----------------------------------------------------------

@pytest.fixture
def gcm_keys(monkeypatch: pytest.MonkeyPatch) -> list[FastGCM]:
    """Every FastGCM the node makes, counting the packets it sealed and opened."""
    return count_cipher_use(FastGCM, monkeypatch)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("alg", ALGS.values())
async def test_openssh_sftp_across_rekeys(sshnode: NodeUnderTest, tmp_path: Path,
                                          gcm_keys: list[FastGCM], alg: str) -> None:
    home, key = sshnode.keyed_user("alice")
    src = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    src.write_bytes(b"".join(bytes([i]) + block[1:] for i in range(40)) + b"tail")
    args = ["sftp", "-v", "-b", "-", "-c", alg, "-o", "RekeyLimit=16M", "-P",
            str(sshnode.port), "-i", str(key), "-o", "IdentitiesOnly=yes", *SSH_OPTS,
            "alice@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    commands = f"put {src} big.bin\nget big.bin {tmp_path / 'back.bin'}\n"
    out = (await asyncio.wait_for(proc.communicate(commands.encode()), 180))[0].decode()
    assert proc.returncode == 0, out
    assert f"kex: client->server cipher: {alg}" in out, out
    assert _digest(home / "big.bin") == _digest(src) == _digest(tmp_path / "back.bin")
    # 80 MiB at 16M per key: the client rekeyed several times, each time to GCM again
    rekeys = len(re.findall(r"SSH2_MSG_NEWKEYS received", out))
    assert rekeys >= 3, out
    await sshnode.wait_idle()
    assert len(gcm_keys) == 2 * rekeys
    # the bulk went through the fast path both ways (40 MiB is 1,280 32 KiB packets)
    assert sum(k.opened for k in gcm_keys) > 1280
    assert sum(k.sealed for k in gcm_keys) > 1280
