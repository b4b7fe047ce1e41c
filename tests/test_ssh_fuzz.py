"""Fuzzing the node: before login, whatever a client sends after (or instead of) its version
line ends that connection only; after login, whatever an SFTP channel carries ends at most
that channel. Nothing is logged as the node's fault (the autouse `unhandled_errors` check in
conftest.py), every session ends, and the node serves on."""
from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sshutil import start_node, stop_node, tree

FUZZ = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

VERSION = st.sampled_from([
    b"SSH-2.0-fuzz\r\n", b"SSH-2.0-fuzz\n", b"SSH-1.99-fuzz\r\n", b"SSH-1.5-old\r\n",
    b"SSH-2.0-" + b"A" * 300 + b"\r\n", b"banner line\r\nSSH-2.0-fuzz\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\xff" * 8, b"",
])


def _packet(padlen: int, payload: bytes, padding_fill: int) -> bytes:
    """An unencrypted SSH binary packet; `padlen` as given, consistent or not."""
    body = bytes([padlen % 256]) + payload + bytes([padding_fill]) * (padlen % 64)
    return len(body).to_bytes(4, "big") + body


# payloads that start with a real message number, so the decoders behind them are reached
PAYLOAD = st.builds(lambda t, rest: bytes([t]) + rest,
                    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 20, 21, 30, 31, 50, 80, 90, 94, 98])
                    | st.integers(0, 255), st.binary(max_size=300))
PACKETS = st.lists(st.builds(_packet, st.integers(0, 300), PAYLOAD | st.just(b""),
                             st.integers(0, 255)), min_size=1, max_size=4).map(b"".join)
LENGTH_ONLY = st.builds(lambda n, rest: n.to_bytes(4, "big") + rest,
                        st.sampled_from([0, 1, 4, 5, 35_000, 262_144, 2**31 - 1, 2**32 - 1])
                        | st.integers(0, 2**32 - 1), st.binary(max_size=64))
STREAM = st.builds(lambda v, body: v + body, VERSION,
                   PACKETS | LENGTH_ONLY | st.binary(max_size=2048))


async def _send(port: int, data: bytes) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(reader.readline(), 5)     # the node speaks first
            writer.write(data)
            await writer.drain()
            await asyncio.wait_for(reader.read(65536), 0.05)
    finally:
        writer.close()


def test_hostile_bytes_before_login_end_only_their_connection(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    node = loop.run_until_complete(start_node(tmp_path))
    try:
        _, key = node.keyed_user("alice")

        @FUZZ
        @given(STREAM)
        def one(data: bytes) -> None:
            loop.run_until_complete(_send(node.port, data))

        one()
        loop.run_until_complete(node.wait_idle())

        async def still_serves() -> str:
            async with node.sftp_client("alice", key) as sftp:
                return await sftp.getcwd()

        assert loop.run_until_complete(still_serves()) == "/"
        ends = node.events("session.disconnect")
        assert len(ends) >= 80 and all(e.detail["reason"] for e in ends)
    finally:
        loop.run_until_complete(stop_node(node))
        loop.close()


# SFTP requests as a client could send them after a good init: a known or random type, a
# request id, then fields that are plausible (paths that climb out, NULs, long names, bytes
# that are not UTF-8, handles never given, huge offsets and lengths) or noise.
_PATH = st.sampled_from([b".", b"/", b"..", b"../../etc/passwd", b"/etc/passwd", b"a/../../b",
                         b"\x00", b"x\x00y", b"\xff\xfe", b"d" * 4000, b"f.txt", b"dir/",
                         b"//", b"link"]) | st.binary(max_size=40)
_STRING = st.builds(lambda b: len(b).to_bytes(4, "big") + b, _PATH)
_U32 = st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big"))
_U64 = st.sampled_from([0, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1]).map(
    lambda n: n.to_bytes(8, "big"))
_FIELDS = st.lists(_STRING | _U32 | _U64 | st.binary(max_size=16), max_size=6).map(b"".join)
_EXTENDED = st.builds(lambda name, rest: len(name).to_bytes(4, "big") + name + rest,
                      st.sampled_from([b"limits@openssh.com", b"copy-data",
                                       b"statvfs@openssh.com", b"fstatvfs@openssh.com",
                                       b"posix-rename@openssh.com", b"hardlink@openssh.com",
                                       b"fsync@openssh.com", b"lsetstat@openssh.com",
                                       b"expand-path@openssh.com", b"nope"]), _FIELDS)
_HANDLE = st.builds(lambda b: len(b).to_bytes(4, "big") + b,
                    st.sampled_from([b"\0\0\0\0", b"\0\0\0\1", b"\0\0\0\2"])
                    | st.binary(max_size=8))              # asyncssh numbers its handles
_ATTRS = st.sampled_from([b"\0\0\0\0", b"\0\0\0\1" + (2**63).to_bytes(8, "big"),
                          b"\0\0\0\4" + (0o7777).to_bytes(4, "big"),
                          b"\0\0\0\x08" + bytes(8), b"\x80\0\0\0" + bytes(4)])
_PFLAGS = st.sampled_from([1, 2, 3, 0x1a, 0x3a, 0x22, 0x0c, 2**32 - 1]).map(
    lambda n: n.to_bytes(4, "big"))
_U32_LEN = st.sampled_from([0, 1, 32768, 262144, 2**31, 2**32 - 1]).map(
    lambda n: n.to_bytes(4, "big"))
# requests laid out as the protocol has them, so that they reach the node's handlers
_WELL_FORMED = st.one_of(
    st.builds(lambda p, f, a: b"\x03" + p + f + a, _STRING, _PFLAGS, _ATTRS),       # open
    st.builds(lambda k, p: bytes([k]) + p, st.sampled_from([7, 11, 13, 15, 16, 17, 19]),
              _STRING),                        # lstat opendir remove rmdir realpath stat readlink
    st.builds(lambda p, a: b"\x0e" + p + a, _STRING, _ATTRS),                       # mkdir
    st.builds(lambda k, p, q: bytes([k]) + p + q, st.sampled_from([18, 20]), _STRING,
              _STRING),                                                            # rename symlink
    st.builds(lambda k, p, a: bytes([k]) + p + a, st.sampled_from([9, 10]), _STRING | _HANDLE,
              _ATTRS),                                                             # (f)setstat
    st.builds(lambda h, o, n: b"\x05" + h + o + n, _HANDLE, _U64, _U32_LEN),       # read
    st.builds(lambda h, o, d: b"\x06" + h + o + d, _HANDLE, _U64, _STRING),        # write
    st.builds(lambda k, h: bytes([k]) + h, st.sampled_from([4, 8, 12]), _HANDLE),  # close fstat readdir
).flatmap(lambda r: _U32.map(lambda rid: r[:1] + rid + r[1:]))
_REQUEST = _WELL_FORMED | _WELL_FORMED | st.builds(
    lambda kind, rid, body: bytes([kind]) + rid + body,
    st.sampled_from(list(range(3, 21))) | st.integers(0, 255), _U32,
    _FIELDS | st.builds(bytes.__add__, _STRING, _FIELDS)) | st.builds(
    lambda rid, body: bytes([200]) + rid + body, _U32, _EXTENDED)
_FRAMED = _REQUEST.map(lambda r: len(r).to_bytes(4, "big") + r)
_SFTP_STREAM = st.lists(_FRAMED, min_size=1, max_size=12).map(b"".join) | st.builds(
    bytes.__add__, st.lists(_FRAMED, max_size=3).map(b"".join),
    _U32 | st.binary(max_size=64))                     # ends inside a packet, or in noise
_INIT = (5).to_bytes(4, "big") + bytes([1]) + (3).to_bytes(4, "big")


def test_hostile_sftp_requests_end_at_most_their_channel(tmp_path: Path) -> None:
    """After login, whatever SFTP bytes a channel carries: each request is answered or the
    channel ends, never the connection or the node; nothing is logged as the node's fault, no
    name outside the user's root appears, and the connection still serves SFTP after."""
    import asyncssh

    loop = asyncio.new_event_loop()
    node = loop.run_until_complete(start_node(tmp_path))
    try:
        home, key = node.keyed_user("alice")
        (home / "f.txt").write_bytes(b"x" * 1000)
        (home / "dir").mkdir()
        root = os.path.relpath(home, tmp_path)

        def outside() -> set[str]:
            """Every name under tmp_path but the user's root and the store's own files."""
            return {n for n in tree(tmp_path) if not n.startswith(root + os.sep)
                    and not os.path.basename(n).startswith("edgegw.db")}

        before = outside()
        conn = loop.run_until_complete(asyncssh.connect(
            "127.0.0.1", node.port, username="alice", client_keys=[str(key)],
            known_hosts=None))

        async def channel(data: bytes) -> None:
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, subsystem="sftp",
                                                encoding=None)
            chan.write(_INIT + data)
            chan.write_eof()        # the server answers what it read, then ends the channel
            await asyncio.wait_for(chan.wait_closed(), 10)

        @FUZZ
        @given(_SFTP_STREAM)
        def one(data: bytes) -> None:
            loop.run_until_complete(channel(data))

        one()

        async def still_serves() -> bytes:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open("after.txt", "wb") as f:
                    await f.write(b"still here")
                async with sftp.open("after.txt", "rb") as f:
                    return await f.read()

        assert loop.run_until_complete(still_serves()) == b"still here"
        conn.close()
        loop.run_until_complete(conn.wait_closed())
        loop.run_until_complete(node.wait_idle())
        assert outside() == before           # nothing made or removed beside the user's root
    finally:
        loop.run_until_complete(stop_node(node))
        loop.close()
