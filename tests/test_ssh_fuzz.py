"""Fuzzing the node's SSH port before login: whatever a client sends after (or instead of) its
version line ends that connection only. Nothing is logged as the node's fault (the autouse
`unhandled_errors` check in conftest.py), every session ends, and the node serves on."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sshutil import start_node, stop_node

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
        _, key = node.add_user("alice")

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
