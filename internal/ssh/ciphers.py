"""The two ciphers bulk SFTP runs on, for the node's packet layer (`internal.ssh.transport`):
aes*-gcm@openssh.com and chacha20-poly1305@openssh.com, byte for byte what asyncssh's own
encryption objects do, with less work per packet:

* AES-GCM with one AESGCM object per key (asyncssh makes one per packet), received packets
  decrypted where they lie in the read buffer, and a single copy per sent packet;
* chacha20-poly1305 with one cipher context per key, a packet to send encrypted from its
  parts where they lie, and on receive the packet authenticated and decrypted straight out
  of the read buffer (asyncssh makes three ChaCha20 contexts and joins header and data twice
  per packet).

Both hand a decrypted channel-data packet back as a memoryview (`_plaintext`), so asyncssh's
slicing of the payload and the channel data out of it copies nothing.

`wrap_cipher` swaps one of asyncssh's encryption objects for its fast twin, or wraps any other
cipher so that it is handed bytes as asyncssh expects.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from asyncssh.constants import MSG_CHANNEL_DATA
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

from internal.ssh.libcrypto import load_chachapoly

def _plaintext(packet: Any) -> Any:
    """A decrypted packet as asyncssh takes it: padding length, type, payload, padding.
    asyncssh slices the payload out of it and then a channel's data out of the payload; over
    a memoryview neither slice copies, so channel data (nearly every byte of an upload) is
    handed out as one and reaches the channel's session without a copy. Every other message
    stays bytes: asyncssh decodes strings and names from those."""
    view = memoryview(packet)
    if len(view) > 1 and view[1] == MSG_CHANNEL_DATA:
        return view
    return packet if type(packet) is bytes else view.tobytes()


_GCM_TAG = 16
_U64 = 0xFFFFFFFFFFFFFFFF
CHACHA_BLOCK0 = bytes(64)   # encrypted at counter 0, it yields the packet's Poly1305 key
_CHACHA_CTR0 = bytes(8)      # ChaCha20's 64-bit block counter, little-endian, before the nonce


class FastGCM:
    """aes*-gcm@openssh.com (RFC 5647) for one direction: same nonce sequence as asyncssh's
    GCMCipher, one AESGCM key schedule per key instead of per packet.

    It stays on the `cryptography` package, not the system's libcrypto as chacha20 does: the
    package brings its own, newer libcrypto, whose AES-GCM uses VAES and AVX-512 where the CPU
    has them. On a 2-vCPU AMD EPYC VM (Debian 12: OpenSSL 3.0.19; cryptography 48: 4.0.3) a
    32 KiB packet took 3.75 µs to seal there and 7.43 µs on the system's, even though sealing
    from the packet's parts on the system's library would have saved their join (0.76 µs)."""

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

    def seal(self, seq: int, header: bytes, parts: Sequence[Any]) -> tuple[Any, ...]:
        """The packet, given as `parts` (buffers, in order), sealed: the buffers that go on
        the wire, in order (the length in the clear, then ciphertext and tag). `seq` is not
        used (the nonce has its own counter); it is there to match FastChaCha.seal."""
        return header, self._aead.encrypt(self._nonce(), b"".join(parts), header)

    # -- asyncssh's Encryption interface ---------------------------------------------------
    @classmethod
    def needs_mac(cls) -> bool:
        return False

    def encrypt_packet(self, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        wire = b"".join(self.seal(seq, header, (packet,)))
        return wire[:-_GCM_TAG], wire[-_GCM_TAG:]

    def decrypt_header(self, seq: int, first_block: Any, header_len: int) -> tuple[Any, Any]:
        return first_block, first_block[:header_len]

    def decrypt_packet(self, seq: int, first: Any, rest: Any, header_len: int,
                       mac: Any) -> Optional[Any]:
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
            return _plaintext(self._aead.decrypt(nonce, data, first[:header_len]))
        except InvalidTag:
            return None


class FastChaCha:
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
        self._evp = load_chachapoly(self._main, self._len)

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

    def seal(self, seq: int, header: bytes, parts: Sequence[Any]) -> tuple[Any, ...]:
        """The packet, given as `parts` (buffers, in order), sealed: the buffers that go on
        the wire, in order (encrypted length, ciphertext, tag). On libcrypto that is one buffer
        the parts were encrypted into where they lie; on `cryptography` the parts are joined
        behind 64 zero bytes first, so that one keystream call gives the Poly1305 key and
        the ciphertext."""
        if self._evp is not None:
            return (self._evp.seal(seq, header, parts),)
        enc_len = self._stream(self._len, seq).update(header)
        out = memoryview(self._stream(self._main, seq).update(
            b"".join((CHACHA_BLOCK0, *parts))))
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
        wire = b"".join(self.seal(seq, header, (packet,)))
        return wire[:-16], wire[-16:]

    def decrypt_header(self, seq: int, first_block: Any, header_len: int) -> tuple[Any, Any]:
        if self._evp is not None:
            return first_block, self._evp.length(seq, first_block[:header_len])
        return first_block, self._stream(self._len, seq).update(first_block[:header_len])

    def decrypt_packet(self, seq: int, first: Any, rest: Any, header_len: int,
                       mac: Any) -> Optional[Any]:
        """`first` is asyncssh's first 8 bytes of the packet, or (from the node's receive
        path) a view from the packet's start over whatever was buffered with it: when that
        already covers `rest`, the ciphertext is read from it without a join."""
        end = self.FIRST + len(rest)
        data = first[:end] if len(first) >= end else b"".join((first[:self.FIRST], rest))
        if self._evp is not None:
            plain = self._evp.open(seq, data, header_len, mac)
            return None if plain is None else _plaintext(plain)
        stream = self._stream(self._main, seq)
        check = Poly1305(stream.update(CHACHA_BLOCK0)[:32])
        check.update(data)
        try:
            check.verify(bytes(mac))
        except InvalidSignature:
            return None
        return _plaintext(stream.update(data[header_len:]))


class BytesIn:
    """Any other cipher: asyncssh's own, handed bytes as it expects (the receive buffer is a
    memoryview here)."""

    def __init__(self, enc: Any) -> None:
        self._enc = enc

    def decrypt_packet(self, seq: int, first: Any, rest: Any, header_len: int,
                       mac: Any) -> Optional[bytes]:
        return self._enc.decrypt_packet(seq, first, bytes(rest), header_len, bytes(mac))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._enc, name)


def wrap_cipher(enc: Any) -> Any:
    """The fast twin of asyncssh's encryption object `enc`, or `enc` behind `BytesIn`."""
    if enc is None:
        return None
    for fast_type in (FastGCM, FastChaCha):
        fast = fast_type.wrap(enc)
        if fast is not enc:
            return fast
    return BytesIn(enc)
