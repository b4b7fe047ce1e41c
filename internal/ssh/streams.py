"""How the node's SSH connection moves bytes between the socket, its channels and the SFTP
server with fewer copies (`internal.ssh.transport` installs these):

* `CorkedTransport`: one socket write per event-loop turn instead of one per packet, the
  turn's packets handed over as a list that uvloop writes with one writev();
* `ViewStreamSession`: channel data kept as memoryviews under the SFTP server, so the stream
  reads that cut SFTP requests out of it copy only once;
* `ViewChannel`: the SFTP server's replies queued as views, and packets cut from them without
  copying (asyncssh copies a reply into a bytearray and moves what is left after every
  32 KiB packet: several copies of every byte of a 256 KiB read reply).
"""
from __future__ import annotations

import asyncio
from typing import Any

from asyncssh.channel import SSHServerChannel
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_EXTENDED_DATA
from asyncssh.stream import SSHServerStreamSession


class CorkedTransport:
    """Collects writes made during one event-loop turn and hands them to the real transport
    together: one send() for a burst of packets instead of one each."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def flush(self) -> None:
        pending = self._pending
        if pending:
            self._pending = []
            if not self._transport.is_closing():
                # uvloop hands a list to one writev() without joining it first (asyncio's
                # selector transport joins it itself)
                self._transport.writelines(pending)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ViewStreamSession(SSHServerStreamSession):
    """asyncssh's stream session under the SFTP server, holding received channel data as
    memoryviews. Its read() slices the first buffered chunk on every read that ends inside
    it and keeps the rest: over bytes both halves are copies, so each SFTP request (a 4-byte
    length, then a body that spans two 32 KiB channel packets) copied most of its bytes two
    or three times before the one join that makes the request. Over views only that join
    copies."""

    def data_received(self, data: Any, datatype: Any) -> None:
        super().data_received(memoryview(data) if type(data) is bytes else data, datatype)


class ViewChannel(SSHServerChannel):
    """asyncssh's server channel with its send queue holding views. asyncssh copies every
    write into a bytearray, cuts each channel packet out of it (a copy, and a move of all
    that is left), then prefixes the packet with its length (a third copy). Here a write of
    bytes is queued as it is, packets are views of it, and the length goes to send_packet
    as a part of its own: the packet's bytes are first copied where they are sealed."""

    def write(self, data: Any, datatype: Any = None) -> None:
        if self._encoding or type(data) is not bytes:   # str, or a buffer its owner may reuse
            super().write(data, datatype)
            return
        if self._send_state != "open":
            raise BrokenPipeError("Channel not open for sending")
        if datatype is not None and datatype not in self._write_datatypes:
            raise OSError("Invalid extended data type")
        if not data:
            return
        self.logger.debug2("Sending %d data byte%s", len(data), "s" if len(data) > 1 else "")
        self._send_buf.append((memoryview(data), datatype))
        self._send_buf_len += len(data)
        self._flush_send_buf()

    def _flush_send_buf(self) -> None:
        # asyncssh's own loop, but for the slicing and the separate length
        while self._send_buf and self._send_window:
            pktsize = min(self._send_window, self._send_pktsize)
            buf, datatype = self._send_buf[0]
            if len(buf) > pktsize:
                data = buf[:pktsize]
                if isinstance(buf, memoryview):
                    self._send_buf[0] = (buf[pktsize:], datatype)
                else:   # a bytearray queued by asyncssh's write()
                    del buf[:pktsize]
            else:
                data = buf
                del self._send_buf[0]
            self._send_buf_len -= len(data)
            self._send_window -= len(data)
            size = len(data).to_bytes(4, "big")
            if datatype is None:
                self.send_packet(MSG_CHANNEL_DATA, size, data)
            else:
                self.send_packet(MSG_CHANNEL_EXTENDED_DATA, datatype.to_bytes(4, "big"), size,
                                 data)
        self._pause_resume_writing()
        if not self._send_buf:
            if self._send_state == "eof_pending":
                self.send_packet(MSG_CHANNEL_EOF)
                self._send_state = "eof"
            elif self._send_state == "close_pending":
                self._close_send()
