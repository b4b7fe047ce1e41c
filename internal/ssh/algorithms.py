"""The SSH algorithms the node offers: modern only, post-quantum hybrid key exchange first.

Order is preference. Nothing here uses SHA-1 (key exchange, MACs or RSA signatures), CBC modes,
DSA or compression: a client that only speaks those is decades out of date and is refused
during key exchange rather than served weakly. OpenSSH 9.9+ and asyncssh clients negotiate
mlkem768x25519-sha256 (store-now-decrypt-later resistance); older OpenSSH falls back to
sntrup761x25519 or curve25519.
"""
from __future__ import annotations

from typing import Any

KEX_ALGS: tuple[str, ...] = (
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)

# AES-GCM first: AES-NI makes it the fastest choice on servers, which matters for throughput.
CIPHERS: tuple[str, ...] = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)

# Only consulted for the CTR ciphers (AEAD ciphers carry their own integrity).
MACS: tuple[str, ...] = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
)

# Host key and user key signatures: no DSA, no ssh-rsa (RSA with SHA-1).
SIGNATURE_ALGS: tuple[str, ...] = (
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)

COMPRESSION: tuple[str, ...] = ("none",)


def algorithm_options() -> dict[str, Any]:
    """Keyword arguments for `asyncssh.SSHServerConnectionOptions` that pin the lists above."""
    return {
        "kex_algs": list(KEX_ALGS),
        "encryption_algs": list(CIPHERS),
        "mac_algs": list(MACS),
        "compression_algs": list(COMPRESSION),
        "signature_algs": list(SIGNATURE_ALGS),
    }
