"""chacha20-poly1305@openssh.com on the system's libcrypto, for the node's hot path.

Why not `cryptography`: it makes a new cipher context for every nonce, and SSH's chacha20 uses
the packet's sequence number as the nonce, with two keys. That is two ChaCha20 contexts and a
Poly1305 per packet each way, about 28 µs of setup per 32 KiB packet on the machine the
benchmarks ran on: more than a second of CPU per GiB before a byte is encrypted. OpenSSH keeps
one context per key and only resets its IV, and so does the node, with OpenSSL 3's EVP
interface, in one of two ways that `load_chachapoly()` chooses from:

* `internal.ssh._aead`, compiled with Cython against OpenSSL's headers: one call per packet;
* where that module was not built, `ChaChaPoly` below, through cffi in ABI mode (no compiler,
  no headers), a dozen foreign calls per packet: about 7 µs more per 32 KiB packet sealed.

It returns None where the library is missing or too old, or when EDGEGW_LIBCRYPTO=0 (for
comparison); the caller then keeps using `cryptography`.

Layout (OpenSSH's PROTOCOL.chacha20poly1305): the 64-byte key is the main key then the length
key; both run with IV = 64-bit block counter 0, 64-bit big-endian sequence number; keystream
block 0 of the main key gives the Poly1305 key, the payload is encrypted from block 1, and the
tag covers the encrypted length and the ciphertext.
"""
from __future__ import annotations

import ctypes.util
import hmac
import logging
import os
from typing import Any, Optional, Sequence

log = logging.getLogger("edgegw.node.crypto")

try:
    from internal.ssh import _aead
except ImportError:   # not built here (no OpenSSL headers at install time): cffi below
    _aead = None  # type: ignore[assignment]

_CDEF = """
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_mac_st EVP_MAC;
typedef struct evp_mac_ctx_st EVP_MAC_CTX;
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
const EVP_CIPHER *EVP_chacha20(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, void *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                      const unsigned char *in, int inl);
EVP_MAC *EVP_MAC_fetch(void *libctx, const char *algorithm, const char *properties);
EVP_MAC_CTX *EVP_MAC_CTX_new(EVP_MAC *mac);
void EVP_MAC_CTX_free(EVP_MAC_CTX *ctx);
int EVP_MAC_init(EVP_MAC_CTX *ctx, const unsigned char *key, size_t keylen, const void *params);
int EVP_MAC_update(EVP_MAC_CTX *ctx, const unsigned char *data, size_t datalen);
int EVP_MAC_final(EVP_MAC_CTX *ctx, unsigned char *out, size_t *outl, size_t outsize);
"""

_CTR0 = bytes(8)          # the 64-bit block counter, little-endian, before the nonce
_BLOCK0 = bytes(64)
_TAG = 16
_SHORT = 256   # packet parts shorter than this are joined before they are encrypted


class CryptoError(Exception):
    """libcrypto refused an operation it accepted at load time (should not happen)."""


class _Lib:
    """The loaded library and what every context shares; created once per process."""

    def __init__(self) -> None:
        from cffi import FFI
        self.ffi = FFI()
        self.ffi.cdef(_CDEF)
        name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
        self.c = self.ffi.dlopen(name)
        self.chacha20 = self.c.EVP_chacha20()
        self.poly1305 = self.c.EVP_MAC_fetch(self.ffi.NULL, b"POLY1305", self.ffi.NULL)
        if self.chacha20 == self.ffi.NULL or self.poly1305 == self.ffi.NULL:
            raise OSError(f"{name} has no ChaCha20 or Poly1305")
        # for decryption output, which is written over whole before it is read
        self.new_uncleared = self.ffi.new_allocator(should_clear_after_alloc=False)

    def cipher(self, key: bytes) -> Any:
        ctx = self.ffi.gc(self.c.EVP_CIPHER_CTX_new(), self.c.EVP_CIPHER_CTX_free)
        if ctx == self.ffi.NULL or not self.c.EVP_EncryptInit_ex(ctx, self.chacha20,
                                                                  self.ffi.NULL, key, bytes(16)):
            raise OSError("EVP_EncryptInit_ex(chacha20) failed")
        return ctx

    def mac(self) -> Any:
        ctx = self.ffi.gc(self.c.EVP_MAC_CTX_new(self.poly1305), self.c.EVP_MAC_CTX_free)
        if ctx == self.ffi.NULL:
            raise OSError("EVP_MAC_CTX_new(POLY1305) failed")
        return ctx


_lib: Optional[_Lib] = None
_load_error: Optional[str] = None


def _library() -> Optional[_Lib]:
    global _lib, _load_error
    if _lib is None and _load_error is None:
        if os.environ.get("EDGEGW_LIBCRYPTO", "1") == "0":
            _load_error = "disabled by EDGEGW_LIBCRYPTO=0"
        else:
            try:
                _lib = _Lib()
            except (ImportError, OSError, AttributeError) as exc:
                _load_error = str(exc)
                log.info("system libcrypto not usable for chacha20-poly1305 (%s); using the "
                         "cryptography package", exc)
    return _lib


class ChaChaPoly:
    """One direction's chacha20-poly1305@openssh.com: a context per key, IV reset per packet.
    Not thread-safe (one per connection direction, used from its event loop)."""

    def __init__(self, lib: _Lib, main_key: bytes, len_key: bytes) -> None:
        self._ffi = lib.ffi
        self._c = lib.c
        self._new_out = lib.new_uncleared
        self._main = lib.cipher(main_key)
        self._len = lib.cipher(len_key)
        self._mac = lib.mac()
        self._outl = self._ffi.new("int *")
        self._tagl = self._ffi.new("size_t *")
        self._tagbuf = self._ffi.new("unsigned char[16]")
        self._polykey = self._ffi.new("unsigned char[64]")

    @classmethod
    def load(cls, main_key: bytes, len_key: bytes) -> Optional["ChaChaPoly"]:
        lib = _library()
        if lib is None:
            return None
        try:
            return cls(lib, main_key, len_key)
        except OSError as exc:   # e.g. a policy that refuses ChaCha20 in libcrypto
            log.warning("libcrypto refused chacha20-poly1305 (%s); using the cryptography "
                        "package for this connection", exc)
            return None

    def _stream(self, ctx: Any, seq: int, data: Any, out: Any) -> None:
        """Encrypt (or decrypt) `data` into `out` from block 0 of the keystream for `seq`."""
        c = self._c
        if not c.EVP_EncryptInit_ex(ctx, self._ffi.NULL, self._ffi.NULL, self._ffi.NULL,
                                    _CTR0 + seq.to_bytes(8, "big")) or \
                not c.EVP_EncryptUpdate(ctx, out, self._outl, data, len(data)):
            raise CryptoError("EVP chacha20 failed")

    def _tag(self, key: Any, chunk: Any, n: int, into: Any) -> None:
        """Poly1305 under the 32-byte one-time `key` over `n` bytes at `chunk`, to `into`."""
        c, ffi = self._c, self._ffi
        if not (c.EVP_MAC_init(self._mac, key, 32, ffi.NULL) and
                c.EVP_MAC_update(self._mac, chunk, n) and
                c.EVP_MAC_final(self._mac, into, self._tagl, _TAG)):
            raise CryptoError("EVP poly1305 failed")

    def seal(self, seq: int, header: bytes, parts: Sequence[Any]) -> Any:
        """The packet, given as `parts` (buffers, in order), sealed into one new buffer as it
        goes on the wire: encrypted length, ciphertext, tag. Each part is encrypted from where
        it lies (ChaCha20 is a stream: an update may end mid-block); runs of short parts
        (the packet's header fields) are joined first, one call for them all."""
        ffi, c = self._ffi, self._c
        hlen = len(header)   # 4; anything up to 32 would leave the Poly1305 key intact
        if hlen > 32:
            raise CryptoError(f"length field of {hlen} bytes")
        n = sum(map(len, parts))
        out = self._new_out("unsigned char[]", 64 + n + _TAG)
        ctx, outl = self._main, self._outl
        # block 0 of the keystream: the Poly1305 key, then the payload from block 1
        ok = c.EVP_EncryptInit_ex(ctx, ffi.NULL, ffi.NULL, ffi.NULL,
                                  _CTR0 + seq.to_bytes(8, "big")) and \
            c.EVP_EncryptUpdate(ctx, out, outl, _BLOCK0, 64)
        pos = 64
        short: list[Any] = []
        for part in (*parts, None):   # None: the end, where the last short parts go out
            if part is not None and len(part) < _SHORT:
                short.append(part)
                continue
            if short:
                head, short = b"".join(short), []
                ok = ok and c.EVP_EncryptUpdate(ctx, out + pos, outl, head, len(head))
                pos += len(head)
            if part is None:
                break
            m = len(part)
            if type(part) is not bytes:
                part = ffi.from_buffer("unsigned char[]", part)
            ok = ok and c.EVP_EncryptUpdate(ctx, out + pos, outl, part, m)
            pos += m
        if not ok:
            raise CryptoError("EVP chacha20 failed")
        # Keystream bytes 32..63 of block 0 are not used: the encrypted length goes there, just
        # before the ciphertext, so the tag is one update over both.
        self._stream(self._len, seq, header, out + (64 - hlen))
        self._tag(out, out + (64 - hlen), n + hlen, out + 64 + n)
        return memoryview(ffi.buffer(out, 64 + n + _TAG))[64 - hlen:]   # keeps `out` alive

    def length(self, seq: int, first: Any) -> bytes:
        """Decrypt the length field (`first`, 4 bytes)."""
        out = bytearray(len(first))
        ffi = self._ffi
        self._stream(self._len, seq, ffi.from_buffer("unsigned char[]", first),
                     ffi.from_buffer("unsigned char[]", out))
        return bytes(out)

    def open(self, seq: int, data: Any, header_len: int, mac: Any) -> Optional[Any]:
        """Check the tag over `data` (encrypted length, then ciphertext) and return the
        decrypted packet (a buffer: bytes() or memoryview() of it), or None if the tag is
        wrong."""
        ffi, c = self._ffi, self._c
        polykey = self._polykey
        self._stream(self._main, seq, _BLOCK0, polykey)   # block 0; the packet follows from 1
        c_data = ffi.from_buffer("unsigned char[]", data)
        self._tag(polykey, c_data, len(data), self._tagbuf)
        if not hmac.compare_digest(ffi.buffer(self._tagbuf, _TAG)[:], bytes(mac)):
            return None
        n = len(data) - header_len
        if n <= 0:
            return b""
        out = self._new_out("unsigned char[]", n)
        if not c.EVP_EncryptUpdate(self._main, out, self._outl, c_data + header_len, n):
            raise CryptoError("EVP chacha20 failed")
        return ffi.buffer(out, n)   # keeps `out` alive


def load_chachapoly(main_key: bytes, len_key: bytes) -> Optional[Any]:
    """One direction's chacha20-poly1305 on the system's libcrypto (compiled where it was
    built, else through cffi), with `seal`, `length` and `open` as `ChaChaPoly` has them; None
    where libcrypto cannot do it or EDGEGW_LIBCRYPTO=0."""
    if os.environ.get("EDGEGW_LIBCRYPTO", "1") == "0":
        return None
    if _aead is None:
        return ChaChaPoly.load(main_key, len_key)
    try:
        return _aead.ChaChaPoly(main_key, len_key)
    except OSError as exc:   # e.g. a policy that refuses ChaCha20 in libcrypto
        log.warning("libcrypto refused chacha20-poly1305 (%s); using the cryptography "
                    "package for this connection", exc)
        return None
