"""TLS for the PNC with roles reversed: the gateway is the TLS *client* on an accepted socket.

The gateway holds no private key. It is given only public trust material (node certificates or
the CA that signed them) and verifies the node that dialed it.
"""
from __future__ import annotations

import ssl
from pathlib import Path

NODE_TLS_NAME = "edgegw-node"


class TrustError(Exception):
    pass


def gateway_context(trust: Path) -> ssl.SSLContext:
    """TLS 1.3 client context that trusts exactly the certificates in `trust`."""
    try:
        data = trust.read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read trust file {trust}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise TrustError(f"{trust} contains a private key; give the gateway certificates only "
                         "(the node's gateway-trust.pem)")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TrustError(f"{trust} holds no PEM certificate; use the node's gateway-trust.pem")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cadata=data.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise TrustError(f"{trust}: not a valid certificate file ({exc.reason})") from None
    return ctx
