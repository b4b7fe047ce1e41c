"""The node's channel send queue (`internal.ssh.streams.ViewChannel`): whatever is written,
however the peer grants window and whatever its packet size, the data packets carry the
bytes written, in order, none larger than the packet size or the window allows, and asyncssh's
own bookkeeping (queued length, EOF after the last byte) stays right."""
from __future__ import annotations

from typing import Any

from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_EXTENDED_DATA
from asyncssh.logging import logger
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from internal.ssh.streams import ViewChannel

CHAN = 7


class _Conn:
    """What a channel needs of its connection: the packets it sends, recorded."""

    logger = logger

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []

    def add_channel(self, chan: Any) -> int:
        return 0

    def get_key_option(self, name: str, default: Any) -> Any:
        return default

    def send_packet(self, pkttype: int, *args: Any, handler: Any = None) -> None:
        self.sent.append((pkttype, b"".join(args)))


def _open_channel(pktsize: int) -> tuple[ViewChannel, _Conn]:
    conn = _Conn()
    # the loop is only kept, for closing; these tests never close the channel
    chan = ViewChannel(conn, None, False, None, False, False, 1024,  # type: ignore[arg-type]
                       None, "strict", 1 << 20, 32768)
    chan._send_state = "open"
    chan._send_chan = CHAN
    chan._send_pktsize = pktsize
    return chan, conn


def _data(pkttype: int, payload: bytes) -> tuple[int | None, bytes]:
    """(datatype, data) of one channel data or extended data packet's payload."""
    assert int.from_bytes(payload[:4], "big") == CHAN
    rest = payload[4:]
    datatype = None
    if pkttype == MSG_CHANNEL_EXTENDED_DATA:
        datatype, rest = int.from_bytes(rest[:4], "big"), rest[4:]
    else:
        assert pkttype == MSG_CHANNEL_DATA
    assert int.from_bytes(rest[:4], "big") == len(rest) - 4
    return datatype, rest[4:]


STEPS = st.lists(
    st.one_of(
        st.binary(min_size=0, max_size=5000).map(lambda b: ("write", (b,))),
        st.lists(st.binary(max_size=3000), max_size=5).map(lambda parts: ("lines", tuple(parts))),
        st.binary(min_size=1, max_size=300).map(lambda b: ("array", (b,))),   # not bytes
        st.binary(min_size=1, max_size=3000).map(lambda b: ("stderr", (b,))),
        st.integers(1, 12000).map(lambda n: ("grant", n)),   # the peer opens its window
    ),
    min_size=1, max_size=30)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, pktsize=st.integers(1, 9000), eof=st.booleans())
def test_packets_carry_what_was_written(steps: list[tuple[str, Any]], pktsize: int,
                                        eof: bool) -> None:
    chan, conn = _open_channel(pktsize)
    expected = {None: b"", 1: b""}
    for kind, arg in steps:
        if kind == "grant":
            chan._send_window += arg
            chan._flush_send_buf()
            continue
        if kind == "write":
            chan.write(arg[0])
        elif kind == "lines":
            chan.writelines(list(arg))
        elif kind == "array":
            chan.write(bytearray(arg[0]))
        else:
            chan.write(arg[0], 1)   # EXTENDED_DATA_STDERR
        expected[1 if kind == "stderr" else None] += b"".join(arg)
        assert chan._send_buf_len == sum(len(buf) for buf, _ in chan._send_buf)
    if eof:
        chan.write_eof()
    chan._send_window += sum(map(len, expected.values()))   # the rest of the window at once
    chan._flush_send_buf()

    got: dict[int | None, bytes] = {None: b"", 1: b""}
    for pkttype, payload in conn.sent:
        if pkttype == MSG_CHANNEL_EOF:
            assert eof and payload == CHAN.to_bytes(4, "big")
            continue
        datatype, data = _data(pkttype, payload)
        assert 0 < len(data) <= pktsize
        got[datatype] += data
    assert got == expected
    assert chan._send_buf == [] and chan._send_buf_len == 0
    assert [t for t, _ in conn.sent].count(MSG_CHANNEL_EOF) == int(eof)
    if eof:
        assert conn.sent[-1][0] == MSG_CHANNEL_EOF


def test_a_packet_gathers_queued_writes_and_respects_the_window() -> None:
    chan, conn = _open_channel(32768)
    chan.writelines([b"\x00\x00\x00\x09", b"\x67", b"id12", b"data"])   # no window yet
    chan.write(b"x" * 40000)
    assert conn.sent == [] and chan._send_buf_len == 13 + 40000
    chan._send_window = 20000
    chan._flush_send_buf()
    # one packet: the four parts and the start of the write, up to the window
    assert len(conn.sent) == 1
    _, data = _data(*conn.sent[0])
    assert data == b"\x00\x00\x00\x09\x67id12data" + b"x" * (20000 - 13)
    assert chan._send_buf_len == 40000 - (20000 - 13)
    chan._send_window = 1 << 20
    chan._flush_send_buf()
    sizes = [len(_data(*sent)[1]) for sent in conn.sent[1:]]
    assert sizes == [40013 - 20000]
    # bytes were queued as views of what was written, not copies
    chan.write(b"y" * 10)
    chan._send_window = 0
    chan.write(b"z" * 10)
    assert [type(buf) for buf, _ in chan._send_buf] == [memoryview]


def test_writes_on_a_closed_channel_are_refused() -> None:
    chan, _ = _open_channel(32768)
    chan._send_state = "closed"
    for call in (lambda: chan.write(b"x"), lambda: chan.writelines([b"x", b"y"])):
        try:
            call()
        except BrokenPipeError:
            continue
        raise AssertionError("write on a closed channel was accepted")
