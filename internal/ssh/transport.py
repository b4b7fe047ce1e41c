"""The SSH packet layer under bulk SFTP: asyncssh's server connection, leaner per packet.

A 1 GiB transfer is ~33,000 SSH packets each way (OpenSSH clients take at most 32 KiB per
channel packet), and asyncssh does every one in Python on the event loop thread. Profiles of
the node (bench/sftp_profile.py) showed the time going into per-packet bookkeeping rather than
the cipher, and this subclass removes what the node does not need:

* one socket write per event-loop turn instead of one per packet (`_CorkedTransport`);
* no SSH_MSG_IGNORE before every packet: asyncssh sends one as the old countermeasure against
  CBC plaintext recovery, and the node offers no CBC cipher (`internal.ssh.algorithms`);
* a receive buffer consumed through a memoryview, so each packet no longer copies everything
  queued behind it; a packet that arrives in many reads is joined once, not once per read,
  and a read that completes a packet has only that packet's head joined, not all of it;
* AES-GCM with one AESGCM object per key, received packets decrypted where they lie in the
  read buffer, and a single copy per sent packet;
* channel data kept as memoryviews under the SFTP server (`_ViewStreamSession`), so the
  stream reads that cut SFTP requests out of it copy only once;
* chacha20-poly1305 with one keystream call for the Poly1305 key and the payload together, no
  header+data joins, and on receive the packet authenticated and decrypted straight out of the
  read buffer (`_FastChaCha`; asyncssh makes three ChaCha20 contexts and joins header and
  data twice per packet);
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
import os
import time
from typing import Any, Optional

import asyncssh
from asyncssh.connection import SSHServerConnection
from asyncssh.packet import SSHPacketLogger
from asyncssh.stream import SSHServerStreamSession
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.poly1305 import Poly1305

try:   # asyncssh's GCM and ChaCha shims; if their layout ever changes the generic path is used
    from asyncssh.encryption import GCMEncryption
except ImportError:   # pragma: no cover
    GCMEncryption = None  # type: ignore[assignment,misc]
try:
    from asyncssh.encryption import ChachaEncryption
except ImportError:   # pragma: no cover
    ChachaEncryption = None  # type: ignore[assignment,misc]

from internal.ssh.libcrypto import ChaChaPoly

_MSG_USERAUTH_LAST = 79


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
_GCM_TAG = 16
_U64 = 0xFFFFFFFFFFFFFFFF
_CHACHA_BLOCK0 = bytes(64)   # encrypted at counter 0, it yields the packet's Poly1305 key
_CHACHA_CTR0 = bytes(8)      # ChaCha20's 64-bit block counter, little-endian, before the nonce


class _FastGCM:
    """aes*-gcm@openssh.com (RFC 5647) for one direction: same nonce sequence as asyncssh's
    GCMCipher, one AESGCM key schedule per key instead of per packet."""

    # asyncssh reads the first cipher block (AES: 16 bytes) before it takes the length;
    # decrypt_packet relies on it
    FIRST = 16

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:], "big")

    @classmethod
    def wrap(cls, enc: Any) -> Any:
        cipher = getattr(enc, "_cipher", None)
        key, iv = getattr(cipher, "_key", None), getattr(cipher, "_iv", None)
        if type(enc) is not GCMEncryption or not isinstance(key, bytes) or \
                not isinstance(iv, bytes) or len(iv) != 12:
            return enc
        return cls(key, iv)

    def _nonce(self) -> bytes:
        nonce = self._fixed + self._counter.to_bytes(8, "big")
        self._counter = (self._counter + 1) & _U64
        return nonce

    def seal(self, header: bytes, packet: bytes) -> bytes:
        """Ciphertext followed by the tag."""
        return self._aead.encrypt(self._nonce(), packet, header)

    # -- asyncssh's Encryption interface ---------------------------------------------------
    @classmethod
    def needs_mac(cls) -> bool:
        return False

    def encrypt_packet(self, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        data = self.seal(header, packet)
        return header + data[:-_GCM_TAG], data[-_GCM_TAG:]

    def decrypt_header(self, seq: int, first_block: Any, header_len: int) -> tuple[Any, Any]:
        return first_block, first_block[:header_len]

    def decrypt_packet(self, seq: int, first: Any, rest: Any, header_len: int,
                       mac: Any) -> Optional[bytes]:
        """`first` is asyncssh's first block, or (from the node's receive path) a view from
        the packet's start over whatever was buffered with it: when that covers the whole
        packet, ciphertext and tag are decrypted in place, without a join."""
        nonce = self._nonce()
        end = self.FIRST + len(rest) + len(mac)
        if len(first) >= end:
            data = first[header_len:end]
        else:
            data = b"".join((first[header_len:self.FIRST], rest, mac))
        try:
            return self._aead.decrypt(nonce, data, first[:header_len])
        except InvalidTag:
            return None


class _FastChaCha:
    """chacha20-poly1305@openssh.com (OpenSSH's PROTOCOL.chacha20poly1305) for one direction,
    byte for byte what asyncssh's ChachaCipher does: the second half of the 64-byte key
    encrypts the 4-byte length, the first half the rest; both use the packet's sequence
    number, 64-bit big-endian, as nonce; the Poly1305 key is the first 32 bytes of block 0 and
    the payload is encrypted from block 1. Per packet: two ChaCha20 contexts, one Poly1305,
    and the payload goes through each of them once."""

    # asyncssh reads a chacha packet's first 8 bytes before its length is known
    # (max(8, cipher block size 1)); decrypt_packet relies on it
    FIRST = 8

    def __init__(self, key: bytes) -> None:
        self._main = key[:32]
        self._len = key[32:]
        # the system's libcrypto with one context per key, when it is there (see its module)
        self._evp = ChaChaPoly.load(self._main, self._len)

    @classmethod
    def wrap(cls, enc: Any) -> Any:
        cipher = getattr(enc, "_cipher", None)
        main, len_key = getattr(cipher, "_key", None), getattr(cipher, "_adkey", None)
        if type(enc) is not ChachaEncryption or not isinstance(main, bytes) or \
                not isinstance(len_key, bytes) or len(main) != 32 or len(len_key) != 32:
            return enc
        return cls(main + len_key)

    @staticmethod
    def _stream(key: bytes, seq: int) -> Any:
        return Cipher(ChaCha20(key, _CHACHA_CTR0 + seq.to_bytes(8, "big")), None).encryptor()

    def seal(self, seq: int, header: bytes, block0_packet: bytes) -> tuple[bytes, Any, bytes]:
        """`block0_packet` is `_CHACHA_BLOCK0` followed by the packet (the caller joins the
        packet anyway): one keystream call then gives the Poly1305 key and the ciphertext.
        Returns the encrypted length, the ciphertext (a memoryview) and the tag."""
        if self._evp is not None:
            return self._evp.seal(seq, header, block0_packet)
        enc_len = self._stream(self._len, seq).update(header)
        out = memoryview(self._stream(self._main, seq).update(block0_packet))
        body = out[64:]
        mac = Poly1305(out[:32])
        mac.update(enc_len)
        mac.update(body)
        return enc_len, body, mac.finalize()

    # -- asyncssh's Encryption interface ---------------------------------------------------
    @classmethod
    def needs_mac(cls) -> bool:
        return False

    def encrypt_packet(self, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        enc_len, body, tag = self.seal(seq, header, _CHACHA_BLOCK0 + packet)
        return enc_len + body, tag

    def decrypt_header(self, seq: int, first_block: Any, header_len: int) -> tuple[Any, Any]:
        if self._evp is not None:
            return first_block, self._evp.length(seq, first_block[:header_len])
        return first_block, self._stream(self._len, seq).update(first_block[:header_len])

    def decrypt_packet(self, seq: int, first: Any, rest: Any, header_len: int,
                       mac: Any) -> Optional[bytes]:
        """`first` is asyncssh's first 8 bytes of the packet, or (from the node's receive
        path) a view from the packet's start over whatever was buffered with it: when that
        already covers `rest`, the ciphertext is read from it without a join."""
        end = self.FIRST + len(rest)
        data = first[:end] if len(first) >= end else b"".join((first[:self.FIRST], rest))
        if self._evp is not None:
            return self._evp.open(seq, data, header_len, mac)
        stream = self._stream(self._main, seq)
        check = Poly1305(stream.update(_CHACHA_BLOCK0)[:32])
        check.update(data)
        try:
            check.verify(bytes(mac))
        except InvalidSignature:
            return None
        return stream.update(data[header_len:])


class _BytesIn:
    """Any other cipher: asyncssh's own, handed bytes as it expects (the receive buffer is a
    memoryview here)."""

    def __init__(self, enc: Any) -> None:
        self._enc = enc

    def decrypt_packet(self, seq: int, first: Any, rest: Any, header_len: int,
                       mac: Any) -> Optional[bytes]:
        return self._enc.decrypt_packet(seq, first, bytes(rest), header_len, bytes(mac))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._enc, name)


def _wrap(enc: Any) -> Any:
    if enc is None:
        return None
    for fast_type in (_FastGCM, _FastChaCha):
        fast = fast_type.wrap(enc)
        if fast is not enc:
            return fast
    return _BytesIn(enc)


class _CorkedTransport:
    """Collects writes made during one event-loop turn and hands them to the real transport
    as one write: one send() for a burst of packets instead of one each."""

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
                self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

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


class _ViewStreamSession(SSHServerStreamSession):
    """asyncssh's stream session under the SFTP server, holding received channel data as
    memoryviews. Its read() slices the first buffered chunk on every read that ends inside
    it and keeps the rest: over bytes both halves are copies, so each SFTP request (a 4-byte
    length, then a body that spans two 32 KiB channel packets) copied most of its bytes two
    or three times before the one join that makes the request. Over views only that join
    copies."""

    def data_received(self, data: Any, datatype: Any) -> None:
        super().data_received(memoryview(data) if type(data) is bytes else data, datatype)


class NodeServerConnection(SSHServerConnection):
    """asyncssh's SSHServerConnection with the per-packet fast path described above."""

    banner_sent = False   # set on an instance whose version line the node wrote itself

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
        super().connection_made(
            _CorkedTransport(transport, self._loop))  # type: ignore[arg-type]

    def _process_session_open(self, packet: Any) -> tuple[Any, Any]:
        chan, session = super()._process_session_open(packet)
        if type(session) is SSHServerStreamSession:
            # asyncssh builds the session itself; the subclass only changes data_received
            session.__class__ = _ViewStreamSession
        return chan, session

    # Both directions' encryption objects are swapped for the fast GCM one when they are set
    # (after each key exchange); anything else is kept as asyncssh made it.
    @property
    def _send_encryption(self) -> Any:
        return self.__dict__.get("_node_send_enc")

    @_send_encryption.setter
    def _send_encryption(self, enc: Any) -> None:
        self.__dict__["_node_send_enc"] = _wrap(enc)

    @property
    def _recv_encryption(self) -> Any:
        return self.__dict__.get("_node_recv_enc")

    @_recv_encryption.setter
    def _recv_encryption(self, enc: Any) -> None:
        self.__dict__["_node_recv_enc"] = _wrap(enc)

    # -- receive ---------------------------------------------------------------------------
    def data_received(self, data: bytes, datatype: Any = None) -> None:
        buf = self._inpbuf
        handler = self._recv_handler
        if handler == self._recv_packet:
            need = (4 + self._pktlen + self._recv_macsize - self._recv_blocksize - len(buf) -
                    self._held_len)
            if need > len(data):
                # A large packet often arrives in many reads (always so through a relay).
                # Joining each read onto what is buffered would copy the packet over and over:
                # keep the reads aside until the whole packet is there, then join once.
                self._held.append(data)
                self._held_len += len(data)
                self._reset_keepalive_timer()
                return
        elif handler == self._recv_pkthdr:
            need = self._recv_blocksize - len(buf)
        else:   # the version line
            need = 0
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
        if (type(enc) is _FastChaCha and bs == _FastChaCha.FIRST) or \
                (type(enc) is _FastGCM and bs == _FastGCM.FIRST):
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
        if type(enc) is _FastChaCha:
            enc_len, body, tag = enc.seal(seq, hdr, b"".join(
                (_CHACHA_BLOCK0, bytes((padlen, pkttype)), *args, os.urandom(padlen))))
            if transport is not None:
                transport.write(enc_len)
                transport.write(body)
                transport.write(tag)
        elif isinstance(enc, _FastGCM):
            data = enc.seal(hdr, b"".join((bytes((padlen, pkttype)), *args,
                                           os.urandom(padlen))))
            if transport is not None:
                transport.write(hdr)
                transport.write(data)
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


def _connection(loop: asyncio.AbstractEventLoop, options: asyncssh.SSHServerConnectionOptions,
                banner_sent: bool) -> NodeServerConnection:
    conn = NodeServerConnection(loop, options, wait="auth")
    conn.banner_sent = banner_sent
    return conn


async def run_server(sock: Any, options: asyncssh.SSHServerConnectionOptions, *,
                     banner_sent: bool = False) -> SSHServerConnection:
    """asyncssh.run_server on a connected socket, with `NodeServerConnection`. `options` are
    this connection's own (prepared already); the handshake waiter is set on them.
    `banner_sent`: the SSH version line (options.version) was written on the socket already."""
    loop = asyncio.get_running_loop()
    opts = options
    waiter: asyncio.Future[None] = loop.create_future()
    opts.waiter = waiter
    _, conn = await loop.create_connection(
        lambda: _connection(loop, opts, banner_sent), sock=sock)
    try:
        await asyncio.wait_for(waiter, timeout=opts.connect_timeout)
    except BaseException:
        conn.abort()
        await conn.wait_closed()
        raise
    return conn
