"""chacha20-poly1305@openssh.com on the system's libcrypto, through cffi, for the node's hot path.

Why not `cryptography`: it makes a new cipher context for every nonce, and SSH's chacha20 uses
the packet's sequence number as the nonce, with two keys. That is two ChaCha20 contexts and a
Poly1305 per packet each way, about 28 µs of setup per 32 KiB packet on the machine the
benchmarks ran on: more than a second of CPU per GiB before a byte is encrypted. OpenSSH keeps
one context per key and only resets its IV. This module does the same, with OpenSSL 3's EVP
interface in ABI mode (no compiler, no headers). `ChaChaPoly.load()` returns None where that
library is missing or too old, or when EDGEGW_LIBCRYPTO=0 (for comparison); the caller then
keeps using `cryptography`.

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
from typing import Any, Optional

log = logging.getLogger("edgegw.node.crypto")

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

    def _tag(self, key: Any, *chunks: tuple[Any, int]) -> bytes:
        """Poly1305 under the 32-byte one-time `key` over the (pointer, length) chunks."""
        c, ffi = self._c, self._ffi
        tag = self._tagbuf
        ok = c.EVP_MAC_init(self._mac, key, 32, ffi.NULL)
        for ptr, n in chunks:
            ok = ok and c.EVP_MAC_update(self._mac, ptr, n)
        if not ok or not c.EVP_MAC_final(self._mac, tag, self._tagl, _TAG):
            raise CryptoError("EVP poly1305 failed")
        return ffi.buffer(tag, _TAG)[:]

    def seal(self, seq: int, header: bytes, block0_packet: bytes) -> tuple[bytes, Any, bytes]:
        """Same contract as the cryptography path: `block0_packet` is 64 zero bytes followed by
        the packet; returns the encrypted length, the ciphertext (a memoryview), the tag."""
        out = bytearray(len(block0_packet))
        c_out = self._ffi.from_buffer("unsigned char[]", out)
        self._stream(self._main, seq, block0_packet, c_out)
        # Keystream bytes 32..63 of block 0 are not used: the encrypted length goes there, just
        # before the ciphertext, so the tag is one update over both.
        hlen = len(header)   # 4; anything up to 32 would leave the Poly1305 key intact
        if hlen > 32:
            raise CryptoError(f"length field of {hlen} bytes")
        self._stream(self._len, seq, header, c_out + (64 - hlen))
        tag = self._tag(c_out, (c_out + (64 - hlen), len(out) - 64 + hlen))
        view = memoryview(out)
        return bytes(view[64 - hlen:64]), view[64:], tag

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
        if not hmac.compare_digest(self._tag(polykey, (c_data, len(data))), bytes(mac)):
            return None
        n = len(data) - header_len
        if n <= 0:
            return b""
        out = self._new_out("unsigned char[]", n)
        if not c.EVP_EncryptUpdate(self._main, out, self._outl, c_data + header_len, n):
            raise CryptoError("EVP chacha20 failed")
        return ffi.buffer(out, n)   # keeps `out` alive
