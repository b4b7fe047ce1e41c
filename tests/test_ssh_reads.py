"""The node's SSH receive path (`internal.ssh.transport.NodeServerConnection.data_received`)
with reads cut anywhere: inside a packet's first block, exactly where a packet ends, a byte
past it, mid-packet, one byte at a time, and whole. Real OpenSSH sftp traffic for both fast
ciphers must arrive intact, and the paths that spare copies (a packet decrypted in place in
the read that holds it, channel data kept as views) must be the ones taken."""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
from pathlib import Path
from typing import Any

import pytest
from asyncssh.constants import MSG_CHANNEL_DATA

from internal.ssh.ciphers import FastChaCha, FastGCM
from internal.ssh.streams import ViewChannel, ViewStreamSession
from internal.sftp.uploads import OpenFile, Upload
from internal.ssh.transport import READ_KEEP_MIN, NodeServerConnection
from tests import sshutil
from tests.procs import SSH_OPTS
from tests.sshutil import NodeUnderTest

sshnode = sshutil.sshnode   # the fixture

CIPHERS = ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"]


def _pending(conn: Any) -> int:
    """Bytes that complete what the connection is waiting for (header or packet); 0 before
    the version line is done."""
    if conn._recv_handler == conn._recv_packet:
        return (4 + conn._pktlen + conn._recv_macsize - conn._recv_blocksize -
                len(conn._inpbuf) - conn._held_len)
    if conn._recv_handler == conn._recv_pkthdr:
        return conn._recv_blocksize - len(conn._inpbuf)
    return 0


@pytest.fixture
def cut_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Every read the node's connections get is handed on in pieces: a quarter cut exactly
    where the pending header or packet ends (or one byte either side of it), the rest at
    random sizes from 1 byte to 3 packets. Counts what was fed."""
    rng = random.Random(20261125)
    real = NodeServerConnection.data_received
    fed = {"reads": 0, "pieces": 0, "exact": 0}

    def data_received(self: Any, data: bytes, datatype: Any = None) -> None:
        fed["reads"] += 1
        pos = 0
        while pos < len(data) and self._transport is not None:
            pending = _pending(self)
            pick = rng.random()
            if pick < 0.25 and pending > 0:
                n = pending + rng.choice((-1, 0, 0, 1))
                fed["exact"] += 1
            elif pick < 0.45:
                n = rng.randint(1, 20)
            else:
                n = rng.randint(1, 100_000)
            n = max(1, min(n, len(data) - pos))
            fed["pieces"] += 1
            real(self, data[pos:pos + n])
            pos += n

    monkeypatch.setattr(NodeServerConnection, "data_received", data_received)
    return fed


@pytest.fixture
def decrypts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many packets each fast cipher opened in place (the view from the packet's start
    held all of it) and how many it had to join."""
    seen = {"in_place": 0, "joined": 0}
    for cls in (FastGCM, FastChaCha):
        real = cls.decrypt_packet

        def decrypt_packet(self: Any, seq: int, first: Any, rest: Any, header_len: int,
                           mac: Any, _real: Any = real, _cls: Any = cls) -> Any:
            whole = len(first) >= _cls.FIRST + len(rest) + (len(mac) if _cls is FastGCM
                                                             else 0)
            seen["in_place" if whole else "joined"] += 1
            return _real(self, seq, first, rest, header_len, mac)

        monkeypatch.setattr(cls, "decrypt_packet", decrypt_packet)
    return seen


async def _sftp(node: NodeUnderTest, cipher: str, key: Path, commands: str) -> str:
    args = ["sftp", "-b", "-", "-c", cipher, "-P", str(node.port), "-i", str(key),
            "-o", "IdentitiesOnly=yes", *SSH_OPTS, "alice@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(commands.encode()), 180)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("cipher", CIPHERS)
async def test_reads_cut_anywhere(sshnode: NodeUnderTest, tmp_path: Path, cipher: str,
                                  cut_reads: dict[str, int], decrypts: dict[str, int]) -> None:
    home, key = sshnode.keyed_user("alice")
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom((4 << 20) + 4321))
    await _sftp(sshnode, cipher, key, f"put {src} up.bin\nget up.bin {tmp_path / 'down.bin'}\n"
                                      f"put {src} again.bin\n")
    assert _digest(home / "up.bin") == _digest(src) == _digest(tmp_path / "down.bin")
    assert _digest(home / "again.bin") == _digest(src)
    await sshnode.wait_idle()
    # the cuts landed where they should: many reads were split, many exactly at a boundary
    assert cut_reads["pieces"] > 2 * cut_reads["reads"]
    assert cut_reads["exact"] > 50
    # ~260 bulk packets came in: both ways of opening them were taken
    assert decrypts["in_place"] > 20 and decrypts["joined"] > 20, decrypts


@pytest.mark.parametrize("cipher", CIPHERS)
async def test_whole_reads_open_packets_in_place(
        sshnode: NodeUnderTest, tmp_path: Path, cipher: str, decrypts: dict[str, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncut loopback reads (up to 256 KiB) hold several packets each: most are opened
    where they lie. Large reads reach the connection as views of the buffer the socket was
    read into; channel data reaches the SFTP session as views of the decrypted packet, and
    the file's writes get views of the request; replies are queued as views of the bytes the
    server wrote."""
    received: list[Any] = []
    chunks: list[Any] = []
    reads: list[tuple[type, type, int]] = []
    stored: list[tuple[type, int]] = []
    writes: list[int] = []
    queued: list[Any] = []
    real_received, real_queue = ViewStreamSession.data_received, ViewChannel._queue
    real_conn_received, real_write = NodeServerConnection.data_received, Upload.write
    real_read = OpenFile.read
    read_back: list[bytes] = []
    queued_ids: set[int] = set()
    sent_data: list[tuple[type, ...]] = []
    real_send = NodeServerConnection.send_packet

    def conn_send(self: Any, pkttype: int, *args: Any, handler: Any = None) -> None:
        if pkttype == MSG_CHANNEL_DATA:   # recipient, length, then the data's parts
            sent_data.append(tuple(map(type, args[2:])))
        real_send(self, pkttype, *args, handler=handler)

    def data_received(self: Any, data: Any, datatype: Any) -> None:
        received.append(self)
        chunks.append(type(data))
        real_received(self, data, datatype)

    def conn_received(self: Any, data: Any, datatype: Any = None) -> None:
        reads.append((type(data), type(getattr(data, "obj", None)), len(data)))
        real_conn_received(self, data, datatype)

    def upload_write(self: Any, offset: int, data: Any) -> int:
        stored.append((type(data), len(data)))
        return real_write(self, offset, data)

    def file_read(self: Any, offset: int, size: int) -> bytes:
        data = real_read(self, offset, size)
        if len(data) > 1024:
            read_back.append(data)   # kept alive, so that ids stay unique
        return data

    def queue(self: Any, parts: Any, datatype: Any) -> None:
        writes.append(sum(map(len, parts)))
        queued_ids.update(map(id, parts))
        real_queue(self, parts, datatype)
        queued.extend(type(buf) for buf, _ in self._send_buf)

    monkeypatch.setattr(ViewStreamSession, "data_received", data_received)
    monkeypatch.setattr(ViewChannel, "_queue", queue)
    monkeypatch.setattr(NodeServerConnection, "data_received", conn_received)
    monkeypatch.setattr(Upload, "write", upload_write)
    monkeypatch.setattr(OpenFile, "read", file_read)
    monkeypatch.setattr(NodeServerConnection, "send_packet", conn_send)
    home, key = sshnode.keyed_user("alice")
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(8 << 20))
    await _sftp(sshnode, cipher, key, f"put {src} up.bin\nget up.bin {tmp_path / 'down.bin'}\n")
    assert _digest(home / "up.bin") == _digest(src) == _digest(tmp_path / "down.bin")
    await sshnode.wait_idle()
    assert decrypts["in_place"] > decrypts["joined"], decrypts
    # reads of READ_KEEP_MIN and more are views of the read buffer, smaller ones were copied
    big = [r for r in reads if r[2] >= READ_KEEP_MIN]
    assert len(big) > 20 and {r[:2] for r in big} == {(memoryview, bytearray)}
    assert {r[:2] for r in reads if r[2] < READ_KEEP_MIN} <= {(bytes, type(None))}
    assert len(set(map(id, received))) == 1 and len(received) > 200
    assert set(chunks) == {memoryview}
    # the client writes up to 256 KiB per request
    assert len(stored) > 20 and sum(n for _, n in stored) == 8 << 20
    assert {t for t, _ in stored} == {memoryview}
    # 8 MiB went back in replies (of up to 256 KiB); what waited for window was not copied
    assert len(writes) > 30 and sum(writes) > 8 << 20
    assert queued and set(queued) == {memoryview}
    # each read reply queued the very bytes the file read returned, not a copy of them
    assert len(read_back) > 20 and all(id(data) in queued_ids for data in read_back)
    # and channel packets reach the connection as views of them, not joined by the channel
    assert len(sent_data) > 256 and all(parts and set(parts) == {memoryview}
                                        for parts in sent_data)


class TestOnUvloop:
    """The node runs on uvloop, whose buffered-protocol reads differ from asyncio's."""

    event_loop = "uvloop"

    @pytest.mark.parametrize("cipher", CIPHERS)
    async def test_whole_reads_open_packets_in_place(
            self, sshnode: NodeUnderTest, tmp_path: Path, cipher: str,
            decrypts: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
        await test_whole_reads_open_packets_in_place(sshnode, tmp_path, cipher, decrypts,
                                                     monkeypatch)


def _plain_packet(payload: bytes) -> bytes:
    """A packet as sent before the first key exchange: no cipher, block size 8."""
    padlen = -(5 + len(payload)) % 8
    if padlen < 4:
        padlen += 8
    body = bytes((padlen,)) + payload + bytes(padlen)
    return len(body).to_bytes(4, "big") + body


async def test_a_first_read_of_16k_and_more_starts_the_key_exchange(
        sshnode: NodeUnderTest) -> None:
    """A client that sends its version line, KEXINIT and more (here SSH_MSG_IGNOREs) in one
    write: the node's first read is READ_KEEP_MIN bytes or more, handed over as a view of
    the read buffer, and the version line must still be parsed from it (asyncssh's parser
    searches it with bytes.find) and answered with the node's KEXINIT."""
    from asyncssh.packet import Byte, NameList, String, UInt32
    from internal.session import SessionContext
    from tests.test_ssh_auth import tcp_pair

    kexinit = b"".join((Byte(20), os.urandom(16), NameList([b"curve25519-sha256"]),
                        NameList([b"ssh-ed25519"]), NameList([b"aes128-ctr"]) * 2,
                        NameList([b"hmac-sha2-256"]) * 2, NameList([b"none"]) * 2,
                        NameList([]) * 2, Byte(0), UInt32(0)))
    ignores = b"".join(_plain_packet(Byte(2) + String(bytes(1000))) for _ in range(20))
    hello = b"SSH-2.0-test\r\n" + _plain_packet(kexinit) + ignores
    assert len(hello) >= READ_KEEP_MIN
    node_end, client_end = tcp_pair()
    client_end.sendall(hello)           # all of it waits in the node's socket: one read
    served = asyncio.create_task(sshnode.service.serve_socket(
        node_end, SessionContext("00112233445566bb", "203.0.113.8", 40000, "gw-1")))
    client_end.setblocking(False)
    loop = asyncio.get_running_loop()
    got = b""
    try:
        while b"\n" not in got or len(got) < got.index(b"\n") + 6:
            chunk = await asyncio.wait_for(loop.sock_recv(client_end, 65536), 10)
            if not chunk:
                break
            got += chunk
    finally:
        client_end.close()
    assert got.startswith(b"SSH-2.0-edgegw"), got
    first = got[got.index(b"\n") + 1:]
    assert len(first) >= 6 and first[5] == 20, got    # the node's KEXINIT
    await asyncio.wait_for(served, 10)


async def test_a_packet_trickling_in_pins_no_read_buffers(sshnode: NodeUnderTest) -> None:
    """Reads of READ_KEEP_MIN bytes and more come as views of a READ_SIZE buffer of their
    own. A packet arriving in many such reads (a slow or hostile client, before it has
    authenticated) must not keep a whole buffer alive per read: 16 KiB reads of a 240 KiB
    packet pinned 15 buffers of 256 KiB, some 4 MiB for 240 KiB received."""
    import tracemalloc

    from internal.session import SessionContext
    from internal.ssh.transport import READ_SIZE
    from tests.test_ssh_auth import tcp_pair

    node_end, client_end = tcp_pair()
    served = asyncio.create_task(sshnode.service.serve_socket(
        node_end, SessionContext("00112233445566cc", "203.0.113.9", 40000, "gw-1")))
    client_end.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(client_end, b"SSH-2.0-test\r\n")
        await asyncio.sleep(0.2)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            pktlen = 250_000      # within the node's packet limit; never completed
            await loop.sock_sendall(client_end, pktlen.to_bytes(4, "big") + bytes(4))
            sent = 8
            while sent < pktlen - 20_000:
                await loop.sock_sendall(client_end, bytes(READ_KEEP_MIN))
                sent += READ_KEEP_MIN
                await asyncio.sleep(0.01)     # one read each
            await asyncio.sleep(0.1)
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert sshnode.service.active == 1            # still waiting for the packet's end
        assert held < 2 * sent + READ_SIZE, (held, sent)
    finally:
        client_end.close()
    await asyncio.wait_for(served, 10)
