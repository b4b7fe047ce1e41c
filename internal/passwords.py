"""Password hashing for SSH password logins: argon2id, PHC strings in the store."""
from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()   # argon2id with the library's current recommended parameters


@functools.cache
def _dummy_hash() -> str:
    """Verified against when a user has no password or does not exist, so that timing does not
    tell an attacker which user names are real. Made with today's parameters, as real hashes
    are; made on first use (it costs as much as a login), not at import: every CLI command
    imports this module. A node that takes passwords calls prepare() before its first client."""
    return _hasher.hash("edgegw: no such password")


def prepare() -> None:
    """Make the dummy hash now, so that the first unknown user's login takes no longer than
    the next one's."""
    _dummy_hash()


def hash_password(pw: str) -> str:
    """A fresh argon2id hash of `pw`; empty passwords are refused."""
    if not pw:
        raise ValueError("the password is empty")
    return _hasher.hash(pw)


def verify_password(stored: str | None, pw: str) -> bool:
    """True when `pw` matches `stored`; False for a mismatch, a missing or a malformed hash."""
    if not stored or not isinstance(stored, str) or not stored.startswith("$argon2"):
        _safe_verify(_dummy_hash(), pw)
        return False
    return _safe_verify(stored, pw)


def needs_rehash(stored: str) -> bool:
    """True when `stored` was made with weaker parameters than today's; rehash after a login."""
    try:
        return _hasher.check_needs_rehash(stored)
    except Exception:
        return True


def _safe_verify(stored: str, pw: str) -> bool:
    try:
        return _hasher.verify(stored, pw if isinstance(pw, str) else "")
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    except Exception:   # malformed parameters in the hash, odd encodings: never an auth crash
        return False
