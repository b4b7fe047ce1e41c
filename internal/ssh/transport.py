"""The SSH packet layer under bulk SFTP: asyncssh's server connection, leaner per packet.

A 1 GiB transfer is ~33,000 SSH packets each way (OpenSSH clients take at most 32 KiB per
channel packet), and asyncssh does every one in Python on the event loop thread. Profiles of
the node (bench/sftp_profile.py) showed the time going into per-packet bookkeeping rather than
the cipher, and this subclass removes what the node does not need:

* fewer copies between the socket, the channels and the SFTP server (`internal.ssh.streams`):
  the socket read into a buffer of the node's own (`ReadInto`) rather than copied out of
  uvloop's, received channel data handed on as views of the decrypted packet down to the
  file's pwrite(), one socket write per event-loop turn, replies queued as views;
* no SSH_MSG_IGNORE before every packet: asyncssh sends one as the old countermeasure against
  CBC plaintext recovery, and the node offers no CBC cipher (`internal.ssh.algorithms`);
* a receive buffer consumed through a memoryview, so each packet no longer copies everything
  queued behind it; a packet that arrives in many reads is joined once, not once per read,
  and a read that completes a packet has only that packet's head joined, not all of it;
* AES-GCM and chacha20-poly1305 that open a received packet where it lies in the read buffer
  and do less per packet than asyncssh's own (`internal.ssh.ciphers`);
* packet logging only when asyncssh's packet-level debug is on, sent and received: asyncssh
  names and sizes every packet for a debug line that its logger then drops. The received side
  is asyncssh's own `_recv_packet`, which calls the logger of whichever handler (connection or
  channel) takes the packet, so that check is installed on asyncssh's `SSHPacketLogger` for the
  whole process; it only skips work whose output would have been discarded.

Everything else (key exchange, rekeying, auth, channels) is asyncssh's own code; packets before
authentication completes, during key exchange, or with compression go through it unchanged.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Optional, cast

import asyncssh
from asyncssh.channel import SSHServerChannel
from asyncssh.connection import SSHServerConnection
from asyncssh.packet import PacketDecodeError, SSHPacketLogger
from asyncssh.stream import SSHServerStreamSession

from edgegw.logthrottle import LogThrottle
from internal.ssh.ciphers import FastChaCha, FastGCM, wrap_cipher
from internal.ssh.streams import CorkedTransport, ViewChannel, ViewStreamSession

_MSG_USERAUTH_LAST = 79
READ_SIZE = 256 * 1024     # uvloop's own read buffer for plain protocols is 250 KB
READ_KEEP_MIN = 16 * 1024  # smaller reads are copied out and their buffer reused
# Bytes queued for the socket beyond what the kernel took before the connection counts as
# paused (asyncio's default, 64 KiB, is a quarter of one SFTP read reply).
SEND_HIGH_WATER = 1 << 20


def _skip_received_packet_log() -> None:
    original = SSHPacketLogger.log_received_packet
    if getattr(original, "_edgegw", False):
        return

    def log_received_packet(self: Any, pkttype: int, pktid: Optional[int], packet: Any,
                            note: str = "") -> None:
        if getattr(self.logger, "_debug_level", 3) >= 3:   # SSHLogger.packet's own test
            original(self, pkttype, pktid, packet, note)

    log_received_packet._edgegw = True   # type: ignore[attr-defined]
    SSHPacketLogger.log_received_packet = log_received_packet  # type: ignore[method-assign]


_skip_received_packet_log()

log = logging.getLogger("edgegw.node.ssh")
_unhandled = LogThrottle(log)   # a client that can set one off could repeat it at will


class NodeServerConnection(SSHServerConnection):
    """asyncssh's SSHServerConnection with the per-packet fast path described above."""

    banner_sent = False   # set on an instance whose version line the node wrote itself

    # asyncssh's own state that this class reads and replaces, typed as it is used here
    # (asyncssh leaves them unannotated): the receive buffer is a view into a read's buffer
    # where it can be, and a pending packet's first block may be one too.
    _inpbuf: bytes | memoryview
    _packet: bytes | memoryview
    _pktlen: int
    _recv_handler: Callable[[], bool]
    _send_seq: int

    def _send_version(self) -> None:
        if not self.banner_sent:
            super()._send_version()
            return
        # asyncssh records its version line for the key exchange hash as it sends it; the
        # line is on the wire already (see SSHService.banner), so only the sending is skipped.
        self._send = lambda data: None   # type: ignore[method-assign]
        try:
            super()._send_version()
        finally:
            del self._send

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._held: list[bytes] = []   # reads of a packet not yet complete (data_received)
        self._held_len = 0
        # asyncssh ignores the transport's pause_writing(); the SFTP server waits on this
        # before it takes the next request (streams.ViewSFTPHandler), so a client that stops
        # reading stops being answered instead of filling the node's memory with answers.
        self._writable = asyncio.Event()
        self._writable.set()
        transport.set_write_buffer_limits(high=SEND_HIGH_WATER)  # type: ignore[attr-defined]
        super().connection_made(
            CorkedTransport(transport, self._loop))  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._writable.set()   # nobody waits for a socket that is gone
        super().connection_lost(exc)

    async def wait_writable(self) -> None:
        """Until the socket takes data again (returns at once while it does)."""
        await self._writable.wait()

    def internal_error(self, exc_info: Any = None, error_logger: Any = None) -> None:
        # An exception nothing handled, in asyncssh or in the node's code under it (maybe set
        # off by a client's bytes), ends the connection with every channel on it; asyncssh
        # says so at its debug level only.
        info = exc_info or sys.exc_info()
        if isinstance(info[1], PacketDecodeError):
            # a packet asyncssh reads without its checks (one with an empty payload, say):
            # the client's malformed bytes, ended as asyncssh ends them, not a fault here
            log.debug("connection ended on a malformed packet: %s", info[1])
            super().internal_error(info, error_logger)
            return
        session = getattr(self.get_owner(), "session", None)
        who = (f"session {session.ctx.session_id} client {session.ctx.client_ip}"
               if session is not None else "a connection")
        _unhandled.log(type(info[1]).__name__, logging.ERROR, "%s ended on an unhandled %s: %s",
                       who, type(info[1]).__name__, info[1], exc_info=info)
        super().internal_error(info, error_logger)

    def _process_session_open(self, packet: Any) -> tuple[Any, Any]:
        chan, session = super()._process_session_open(packet)
        # asyncssh builds both itself; the subclasses only change how data is queued
        if type(chan) is SSHServerChannel:
            chan.__class__ = ViewChannel
        if type(session) is SSHServerStreamSession:
            session.__class__ = ViewStreamSession
        return chan, session

    # Both directions' encryption objects are swapped for their fast twins when they are set
    # (after each key exchange); anything else is kept as asyncssh made it.
    @property
    def _send_encryption(self) -> Any:
        return self.__dict__.get("_node_send_enc")

    @_send_encryption.setter
    def _send_encryption(self, enc: Any) -> None:
        self.__dict__["_node_send_enc"] = wrap_cipher(enc)

    @property
    def _recv_encryption(self) -> Any:
        return self.__dict__.get("_node_recv_enc")

    @_recv_encryption.setter
    def _recv_encryption(self, enc: Any) -> None:
        self.__dict__["_node_recv_enc"] = wrap_cipher(enc)

    # -- receive ---------------------------------------------------------------------------
    def data_received(self, data: bytes | memoryview, datatype: Any = None) -> None:
        buf = self._inpbuf
        handler = self._recv_handler
        if handler == self._recv_packet:
            need = (4 + self._pktlen + self._recv_macsize - self._recv_blocksize - len(buf) -
                    self._held_len)
            if need > len(data):
                # A large packet often arrives in many reads (always so through a relay).
                # Joining each read onto what is buffered would copy the packet over and over:
                # keep the reads aside until the whole packet is there, then join once.
                self._held.append(_unpinned(data))
                self._held_len += len(data)
                self._reset_keepalive_timer()
                return
        elif handler == self._recv_pkthdr:
            need = self._recv_blocksize - len(buf)
        else:   # the version line, or a packet being handled asynchronously
            need = 0
            if handler == self._recv_version and isinstance(data, memoryview):
                data = data.tobytes()   # asyncssh's parser calls bytes.find() on it
        if need > 0 and (buf or self._held) and need <= len(data):
            # Most reads end inside a packet. Joining the next read whole onto that leftover
            # would copy every byte received once more: join only the head that completes
            # the pending header or packet, and parse the rest of the read in place.
            view = memoryview(data)
            self._inpbuf = b"".join((buf, *self._held, view[:need]))
            self._held = []
            self._held_len = 0
            self._recv_data()
            if self._transport is None or need == len(data):   # closed by it, or all parsed
                return
            buf, data = self._inpbuf, view[need:]
        if not buf:
            self._inpbuf = data
        elif isinstance(buf, memoryview) or isinstance(data, memoryview):
            self._inpbuf = b"".join((buf, data))
        else:
            self._inpbuf = buf + data
        self._recv_data()
        # What is left waits for the next read: it must not pin a whole read buffer.
        self._inpbuf = _unpinned(self._inpbuf)
        if self._recv_handler == self._recv_packet and isinstance(self._packet, memoryview):
            # a pending packet's rest is in _inpbuf: only its first block is read from here
            self._packet = self._packet[:self._recv_blocksize].tobytes()

    def _recv_pkthdr(self) -> bool:
        # asyncssh slices `_inpbuf` once per packet; over a memoryview that costs nothing,
        # where slicing bytes copied the whole rest of the read each time.
        buf = self._inpbuf
        bs = self._recv_blocksize
        if len(buf) < bs:
            return False
        if not isinstance(buf, memoryview):
            buf = memoryview(buf)
        self._inpbuf = buf[bs:]
        enc = self._recv_encryption
        if type(enc) in (FastChaCha, FastGCM) and bs == enc.FIRST:
            # the whole view: if the packet is already buffered, it is decrypted from here
            self._packet, pktlen = enc.decrypt_header(self._recv_seq, buf, 4)
        else:
            first = bytes(buf[:bs])
            if enc:
                self._packet, pktlen = enc.decrypt_header(self._recv_seq, first, 4)
            else:
                self._packet, pktlen = first, first[:4]
        self._pktlen = int.from_bytes(pktlen, "big")
        if self._pktlen > self._max_recv_pktlen:
            raise asyncssh.ProtocolError("Max packet size exceeded")
        self._recv_handler = self._recv_packet
        return True

    # -- send ------------------------------------------------------------------------------
    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        enc = self._send_encryption
        if (pkttype <= _MSG_USERAUTH_LAST or enc is None or not self._kex_complete or
                not self._auth_complete or self._compressor is not None or
                self._rekey_bytes_sent >= self._rekey_bytes or
                (self._rekey_seconds and time.monotonic() >= self._rekey_time)):
            super().send_packet(pkttype, *args, handler=handler)
            return
        payload_len = 1 + sum(map(len, args))
        blocksize = self._send_blocksize
        padlen = -(self._send_enchdrlen + payload_len) % blocksize
        if padlen < 4:
            padlen += blocksize
        pktlen = 1 + payload_len + padlen
        hdr = pktlen.to_bytes(4, "big")
        seq = self._send_seq
        transport = self._transport
        if type(enc) in (FastChaCha, FastGCM):
            wire = enc.seal(seq, hdr, (bytes((padlen, pkttype)), *args, os.urandom(padlen)))
            if transport is not None:
                transport.writelines(wire)
        else:
            packet = b"".join((bytes((padlen, pkttype)), *args, os.urandom(padlen)))
            data, mac = enc.encrypt_packet(seq, hdr, packet)
            if transport is not None:
                transport.write(data)
                transport.write(mac)
        self._send_seq = (seq + 1) & 0xFFFFFFFF
        self._rekey_bytes_sent += pktlen
        logger = (handler or self).logger
        if getattr(logger, "_debug_level", 3) >= 3:
            (handler or self).log_sent_packet(pkttype, seq, bytes((pkttype,)) + b"".join(args))


def _unpinned(data: Any) -> Any:
    """`data`, copied out if it is a view that keeps alive a buffer mostly not its own (a
    large read's, `ReadInto`): kept across reads, such views let a client that sends a
    packet in 16 KiB pieces make the node hold 256 KiB per piece. Views that fill a good
    part of their buffer are kept as they are (no copy on the bulk path)."""
    if isinstance(data, memoryview) and len(data) * 4 < len(cast(bytes, data.obj)):
        return data.tobytes()
    return data


class _SpareBuffer(threading.local):
    buf: Optional[bytearray] = None


# The buffer the next read goes into, shared by the thread's connections as uvloop shares its
# own: a read's get_buffer() and buffer_updated() follow each other with nothing in between.
_spare = _SpareBuffer()


class ReadInto(asyncio.BufferedProtocol):
    """The socket's protocol in front of a `NodeServerConnection`: uvloop reads each chunk
    into a buffer of ours, and the connection gets a view of it. A plain Protocol is handed a
    new bytes object that uvloop copied out of its own read buffer: one more copy of every
    byte received. A large read hands its buffer over to the connection (the packets in it
    are decrypted and sliced where they lie) and the next read gets a new one; a small read
    is copied out and the buffer stays, so no connection holds one while it is idle."""

    def __init__(self, conn: NodeServerConnection) -> None:
        self.conn = conn

    def get_buffer(self, sizehint: int) -> bytearray:
        buf = _spare.buf
        if buf is None:
            buf = _spare.buf = bytearray(READ_SIZE)
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        buf = _spare.buf
        assert buf is not None
        if nbytes < READ_KEEP_MIN:
            data: Any = bytes(memoryview(buf)[:nbytes])
        else:
            data = memoryview(buf)[:nbytes]
            _spare.buf = None
        self.conn.data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.connection_made(transport)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.conn.connection_lost(exc)

    def eof_received(self) -> Optional[bool]:
        return self.conn.eof_received()   # type: ignore[func-returns-value]

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


def _read_into(loop: asyncio.AbstractEventLoop, options: asyncssh.SSHServerConnectionOptions,
               banner_sent: bool) -> ReadInto:
    conn = NodeServerConnection(loop, options, wait="auth")
    conn.banner_sent = banner_sent
    return ReadInto(conn)


async def run_server(sock: Any, options: asyncssh.SSHServerConnectionOptions, *,
                     banner_sent: bool = False) -> SSHServerConnection:
    """asyncssh.run_server on a connected socket, with `NodeServerConnection`. `options` are
    this connection's own (prepared already); the handshake waiter is set on them.
    `banner_sent`: the SSH version line (options.version) was written on the socket already."""
    loop = asyncio.get_running_loop()
    opts = options
    waiter: asyncio.Future[None] = loop.create_future()
    opts.waiter = waiter
    _, reader = await loop.create_connection(
        lambda: _read_into(loop, opts, banner_sent), sock=sock)
    conn = reader.conn
    try:
        await asyncio.wait_for(waiter, timeout=opts.connect_timeout)
    except BaseException:
        conn.abort()
        await conn.wait_closed()
        raise
    return conn
