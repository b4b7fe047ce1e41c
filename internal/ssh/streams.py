"""How the node's SSH connection moves bytes between the socket, its channels and the SFTP
server with fewer copies (`internal.ssh.transport` installs these):

* `CorkedTransport`: one socket write per event-loop turn instead of one per packet, the
  turn's packets handed over as a list that uvloop writes with one writev();
* `ViewStreamSession`: channel data kept as memoryviews under the SFTP server, so the stream
  reads that cut SFTP requests out of it copy only once; a write request's data is then
  sliced out of the request as a view (`_WritePacket`) and stored from it;
* `ViewSFTPHandler` and `ViewChannel`: the SFTP server's replies handed to the channel as
  parts, queued as views, and packets gathered from them without copying (asyncssh joins a
  reply's parts twice, copies it into a bytearray and moves what is left after every 32 KiB
  packet: several copies of every byte of a 256 KiB read reply).
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, Awaitable, Callable, Optional

from asyncssh import ChannelOpenError
from asyncssh.channel import SSHServerChannel
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_EXTENDED_DATA
from asyncssh.packet import SSHPacket
from asyncssh.sftp import (FXP_DATA, FXP_READ, FXP_WRITE, MAX_SFTP_PACKET_LEN,
                           MAX_SFTP_WRITE_LEN, SFTPBadMessage, SFTPInvalidHandle, SFTPLimits,
                           SFTPNoConnection, SFTPServerHandler)
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

from internal.sftp.server import MAX_HANDLES, MAX_READ


SFTP_SEND_HIGH_WATER = 4 * MAX_READ


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


_FXP_WRITE = bytes((FXP_WRITE,))


class _WritePacket(SSHPacket):
    """An SFTP write request parsed over a memoryview: the data comes out as a view, without
    a copy. Short fields come out as bytes: the handle is looked up in a dict, and hashing a
    memoryview hashes the whole object under it (the request) first."""

    def __init__(self, packet: bytes) -> None:
        super().__init__(memoryview(packet))  # type: ignore[arg-type]

    def get_bytes(self, size: int) -> bytes:
        value = super().get_bytes(size)
        return bytes(value) if size <= 256 else value


# A reply type of the node's own, never on the wire: an FXP_DATA reply whose body is parts
_FXP_DATA_PARTS = 0x100 | FXP_DATA


class _DataReply:
    """A read request's reply body as parts (the data's length, the data as read) for
    `ViewSFTPHandler.send_packet`. asyncssh makes it `String(data)`: a copy of the data.
    asyncssh's request loop hands a result of a reply type it does not know to `encode()`
    and sends what that returns, which is how this reaches send_packet whole."""

    __slots__ = ("parts",)

    def __init__(self, data: bytes, at_end: bool, version: int) -> None:
        self.parts: tuple[bytes, ...] = (len(data).to_bytes(4, "big"), data)
        if at_end and version >= 6:
            self.parts += (b"\x01",)

    def encode(self, version: int) -> "_DataReply":
        return self

    def __str__(self) -> str:
        return f"{len(self.parts[1])} data bytes"


class ViewSFTPHandler(SFTPServerHandler):
    """asyncssh's SFTP server handler, sending each reply as parts. asyncssh builds a reply
    as `UInt32(len) + Byte(type) + b"".join(args)`, and a read reply's body as
    `String(data)`: four copies of a 256 KiB read reply before the channel sees it. Here the
    parts go to the channel as they are."""

    def __init__(self, server: Any, reader: SSHReader, writer: SSHWriter, version: int
                 ) -> None:
        super().__init__(server, reader, writer, version)
        # the connection's, looked up once: the channel forgets its connection once the
        # client has closed it, and is read to its end all the same
        self._wait_writable: Optional[Callable[[], Awaitable[None]]] = getattr(
            writer.channel.get_extra_info("connection"), "wait_writable", None)

    async def run(self) -> None:
        # asyncssh reads the client's init unguarded: a channel closed before it (`ssh -n -s
        # sftp`, a client giving up) raised out of the handler, which made asyncssh drop the
        # whole connection, with every other channel on it, and never call the server's
        # exit(), so the session's quota share and record waited out a timeout. After the
        # init, asyncssh's own loop ends a session this way on these errors.
        try:
            await super().run()
        except EOFError:
            await self._cleanup(None)
        except OSError as exc:
            await self._cleanup(exc)

    async def _process_read_parts(self, packet: SSHPacket) -> _DataReply:
        data, at_end = await SFTPServerHandler._process_read(self, packet)
        return _DataReply(data, at_end, self._version)

    async def _process_our_limits(self, packet: SSHPacket) -> SFTPLimits:
        """limits@openssh.com with the bounds the node's server keeps, not asyncssh's defaults
        (4 MiB reads, the process's whole descriptor table): clients size their reads by it."""
        packet.check_end()
        return SFTPLimits(MAX_SFTP_PACKET_LEN, MAX_READ, MAX_SFTP_WRITE_LEN, MAX_HANDLES)

    async def _process_whole_copy(self, packet: SSHPacket) -> None:
        """copy-data through the server's own copy (SFTPServer.copy_data), not asyncssh's
        loop of reads and writes."""
        src_handle, src_offset = packet.get_string(), packet.get_uint64()
        length = packet.get_uint64()
        dst_handle, offset = packet.get_string(), packet.get_uint64()
        packet.check_end()
        src, dst = self._file_handles.get(src_handle), self._file_handles.get(dst_handle)
        if src is None or dst is None:
            raise SFTPInvalidHandle("invalid file handle")
        await self._server.copy_data(src, src_offset, length, dst, offset)

    _packet_handlers = {**SFTPServerHandler._packet_handlers, FXP_READ: _process_read_parts,
                        b"limits@openssh.com": _process_our_limits,
                        b"copy-data": _process_whole_copy}
    _return_types = {**SFTPServerHandler._return_types, FXP_READ: _FXP_DATA_PARTS}

    async def recv_packet(self) -> SSHPacket:
        # asyncssh's, except for write requests (other requests carry names that asyncssh
        # decodes: they stay bytes), and that the next request waits while the answers to
        # the last ones are not taken: asyncssh answers every request it reads, and a client
        # that sent thousands of READs and stopped reading made the node hold gigabytes of
        # answers (OpenSSH's sftp-server stops reading requests while its output is full)
        reader, writer = self._reader, self._writer
        assert reader is not None
        if writer is not None:
            await writer.drain()            # the client's channel window is closed
            if self._wait_writable is not None:
                await self._wait_writable()  # its socket is full
        pktlen = int.from_bytes(await reader.readexactly(4), "big")
        if pktlen > MAX_SFTP_PACKET_LEN:
            raise SFTPBadMessage("Max packet size exceeded")
        packet = await reader.readexactly(pktlen)
        return _WritePacket(packet) if packet[:1] == _FXP_WRITE else SSHPacket(packet)

    def send_packet(self, pkttype: int, pktid: Optional[int], *args: bytes) -> None:
        writer = self._writer
        if not writer:
            raise SFTPNoConnection("Connection not open")
        if writer.channel.is_closing():
            return
        if pkttype == _FXP_DATA_PARTS:   # (request id, _DataReply)
            pkttype = FXP_DATA
            args = (args[0], *args[1].parts)  # type: ignore[attr-defined]
        size = 1 + sum(map(len, args))
        writer.writelines((size.to_bytes(4, "big"), bytes((pkttype,)), *args))
        if getattr(self.logger, "_debug_level", 3) >= 3:   # asyncssh logs packets at 3
            self.log_sent_packet(pkttype, pktid, bytes((pkttype,)) + b"".join(args))


async def _run_sftp(server: Any, reader: SSHReader, writer: SSHWriter, version: int) -> None:
    # asyncssh.sftp.run_sftp_server, with the handler above
    if inspect.isawaitable(server):
        try:
            server = await server
        except ChannelOpenError as exc:
            # The node refused this user an SFTP server (a session over its cap, an account
            # whose root is unsafe): the channel ends with the reason on its stderr and
            # status 1. Raised on, it ended the whole connection as an internal error.
            reader.logger.info("SFTP refused: %s", exc.reason)
            chan = writer.channel
            if not chan.is_closing():
                chan.write_stderr(f"{exc.reason}\n".encode())
                chan.exit(1)
            return
    await ViewSFTPHandler(server, reader, writer, version).run()


class ViewStreamSession(SSHServerStreamSession):
    """asyncssh's stream session under the SFTP server, holding received channel data as
    memoryviews. Its read() slices the first buffered chunk on every read that ends inside
    it and keeps the rest: over bytes both halves are copies, so each SFTP request (a 4-byte
    length, then a body that spans two 32 KiB channel packets) copied most of its bytes two
    or three times before the one join that makes the request. Over views only that join
    copies. An SFTP subsystem runs `ViewSFTPHandler`."""

    def data_received(self, data: Any, datatype: Any) -> None:
        super().data_received(memoryview(data) if type(data) is bytes else data, datatype)

    # asyncssh refuses all but the SFTP subsystem (the node gives it no shell, no commands,
    # no scp): the connection's owner logs and audits each refusal
    def shell_requested(self) -> bool:
        return super().shell_requested() or self._refused("shell")

    def exec_requested(self, command: str) -> bool:
        return super().exec_requested(command) or self._refused("exec", command)

    def subsystem_requested(self, subsystem: str) -> bool:
        return super().subsystem_requested(subsystem) or self._refused("subsystem", subsystem)

    def _refused(self, request: str, target: str = "") -> bool:
        owner = self._conn.get_owner() if self._conn is not None else None
        refuse = getattr(owner, "refuse", None)
        if refuse is not None:
            refuse(request, target)
        return False

    def session_started(self) -> None:
        chan = self._chan
        if chan is None or chan.get_subsystem() != "sftp":
            super().session_started()
            return
        reader: SSHReader = SSHReader(self, chan)
        writer: SSHWriter = SSHWriter(self, chan)
        # a few read replies may wait for the client's window before requests wait for them
        chan.set_write_buffer_limits(high=SFTP_SEND_HIGH_WATER)
        reader.logger.info("Starting SFTP server")
        assert self._conn is not None
        self._conn.create_task(_run_sftp(self._init_sftp_server(), reader, writer,
                                         self._sftp_version), reader.logger)


class ViewChannel(SSHServerChannel):
    """asyncssh's server channel with its send queue holding views. asyncssh copies every
    write into a bytearray (writelines() joins first), cuts each channel packet out of it (a
    copy, and a move of all that is left), then prefixes the packet with its length (a third
    copy). Here bytes are queued as they are, a packet is gathered from views of them, and
    the length and the recipient channel go to the connection as parts of their own (asyncssh's
    send_packet joins the parts and prepends the recipient: two more copies): the packet's
    bytes are first copied where they are sealed."""

    _send_state: str   # asyncssh's, unannotated there: "open", "eof_pending", "close_pending", ...

    def send_packet(self, pkttype: int, *args: Any) -> None:
        if self._send_chan is None:
            return
        self._conn.send_packet(pkttype, self._send_chan.to_bytes(4, "big"), *args,
                               handler=self)

    def write(self, data: Any, datatype: Any = None) -> None:
        if self._encoding or type(data) is not bytes:   # str, or a buffer its owner may reuse
            super().write(data, datatype)
            return
        self._queue((data,), datatype)

    def writelines(self, list_of_data: Any, datatype: Any = None) -> None:
        parts = tuple(list_of_data)
        if self._encoding or any(type(part) is not bytes for part in parts):
            super().writelines(parts, datatype)
            return
        self._queue(parts, datatype)

    def _queue(self, parts: tuple[bytes, ...], datatype: Any) -> None:
        # asyncssh's write() checks, then the parts as views
        if self._send_state != "open":
            raise BrokenPipeError("Channel not open for sending")
        if datatype is not None and datatype not in self._write_datatypes:
            raise OSError("Invalid extended data type")
        size = sum(map(len, parts))
        if not size:
            return
        self.logger.debug2("Sending %d data byte%s", size, "s" if size > 1 else "")
        self._send_buf.extend((memoryview(part), datatype) for part in parts if part)
        self._send_buf_len += size
        self._flush_send_buf()

    def _flush_send_buf(self) -> None:
        # asyncssh's own loop, but a packet gathers views from as many queued writes as fit
        queue = self._send_buf
        while queue and self._send_window:
            room = min(self._send_window, self._send_pktsize)
            datatype = queue[0][1]
            parts: list[Any] = []
            size = 0
            while queue and size < room and queue[0][1] == datatype:
                buf = queue[0][0]
                if len(buf) > room - size:
                    take = room - size
                    parts.append(buf[:take])
                    if isinstance(buf, memoryview):
                        queue[0] = (buf[take:], datatype)
                    else:   # a bytearray queued by asyncssh's write()
                        del buf[:take]
                    size = room
                else:
                    parts.append(buf)
                    del queue[0]
                    size += len(buf)
            self._send_buf_len -= size
            self._send_window -= size
            length = size.to_bytes(4, "big")
            if datatype is None:
                self.send_packet(MSG_CHANNEL_DATA, length, *parts)
            else:
                self.send_packet(MSG_CHANNEL_EXTENDED_DATA, datatype.to_bytes(4, "big"), length,
                                 *parts)
        self._pause_resume_writing()
        if not queue:
            if self._send_state == "eof_pending":
                self.send_packet(MSG_CHANNEL_EOF)
                self._send_state = "eof"
            elif self._send_state == "close_pending":
                self._close_send()
