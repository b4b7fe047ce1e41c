from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from internal.passwords import hash_password, needs_rehash, verify_password


def test_hash_and_verify():
    h = hash_password("correct horse")
    assert h.startswith("$argon2id$")
    assert h != hash_password("correct horse")          # salted
    assert verify_password(h, "correct horse")
    assert not verify_password(h, "correct horsE")
    assert not needs_rehash(h)


def test_empty_password_refused():
    with pytest.raises(ValueError, match="empty"):
        hash_password("")


@pytest.mark.parametrize("stored", [
    None, "", "plaintext", "$argon2id$", "$argon2id$v=19$m=1,t=1,p=1$xx$yy",
    "$argon2id$v=19$m=65536,t=3,p=4$!!!$???", "$2b$12$bcrypt-not-supported", "\x00" * 10,
])
def test_garbage_hashes_never_raise(stored):
    assert verify_password(stored, "pw") is False


@settings(max_examples=30, deadline=None)
@given(stored=st.text(max_size=80), pw=st.text(max_size=20))
def test_fuzz_verify_never_raises(stored, pw):
    assert verify_password("$argon2id$" + stored, pw) is False


def test_unknown_users_verify_against_a_dummy_made_with_todays_parameters(monkeypatch):
    """No user, or no password: the password is still checked against an argon2id hash made
    with the hasher's own parameters (made once, by prepare() or the first such login), so
    the answer takes as long as for a real user's wrong password."""
    from internal import passwords

    passwords.prepare()
    dummy = passwords._dummy_hash()
    assert dummy.startswith("$argon2id$") and not needs_rehash(dummy)
    seen: list[str] = []
    real_verify = passwords._safe_verify
    monkeypatch.setattr(passwords, "_safe_verify",
                        lambda stored, pw: seen.append(stored) or real_verify(stored, pw))
    assert verify_password(None, "guess") is False
    assert verify_password("", "guess") is False
    assert seen == [dummy, dummy]
