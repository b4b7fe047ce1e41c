from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from internal.ipmatch import banned_by, canonical_cidr, parse_cidr, parse_ip, user_allows_ip
from internal.store import User


def _u(allow=(), deny=()):
    return User(name="u", home="/h", allow_cidrs=list(allow), deny_cidrs=list(deny))


def test_parse_cidr():
    assert parse_cidr("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_cidr(" 192.0.2.7 ") == ipaddress.ip_network("192.0.2.7/32")
    assert parse_cidr("2001:db8::/32").prefixlen == 32
    assert parse_cidr("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    for bad in ("", "10.0.0.0/33", "example.com", "1.2.3", "10.0.0.0/8/8"):
        with pytest.raises(ValueError, match="not an IP address or CIDR"):
            parse_cidr(bad)


def test_canonical_forms():
    assert canonical_cidr("192.0.2.7/32") == "192.0.2.7"
    assert canonical_cidr("::ffff:192.0.2.7") == "192.0.2.7"
    assert canonical_cidr("10.9.9.9/8") == "10.0.0.0/8"
    assert str(parse_ip("fe80::1%eth0")) == "fe80::1"
    assert str(parse_ip("::ffff:192.0.2.1")) == "192.0.2.1"


def test_banned_by():
    assert banned_by("10.2.3.4", ["192.0.2.0/24", "10.0.0.0/8"])
    assert banned_by("::ffff:10.2.3.4", ["10.0.0.0/8"])
    assert banned_by("10.2.3.4", ["::ffff:10.0.0.0/104"])
    assert not banned_by("11.0.0.1", ["10.0.0.0/8"])
    assert not banned_by("::1", ["0.0.0.0/0"])
    assert banned_by("garbage", ["10.0.0.0/8"])         # ban lists fail closed (as the Defender)
    assert banned_by("", [])
    assert not banned_by("10.0.0.1", ["garbage"])
    assert not banned_by("10.0.0.1", [])


def test_user_allows_ip():
    assert user_allows_ip(_u(), "203.0.113.1")                          # no rules: anyone
    assert user_allows_ip(_u(allow=["10.0.0.0/8"]), "10.1.1.1")
    assert not user_allows_ip(_u(allow=["10.0.0.0/8"]), "11.1.1.1")
    assert not user_allows_ip(_u(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"]), "10.1.1.1")  # deny wins
    assert not user_allows_ip(_u(deny=["192.0.2.1"]), "::ffff:192.0.2.1")
    assert user_allows_ip(_u(allow=["2001:db8::/32"]), "2001:db8::5")
    assert not user_allows_ip(_u(), "not-an-ip")                       # fails closed
    assert not user_allows_ip(_u(deny=["bogus"]), "10.0.0.1")          # broken deny: closed


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_mapped_and_plain_agree(addr, prefix):
    net = str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
    mapped = f"::ffff:{addr}"
    assert banned_by(str(addr), [net]) and banned_by(mapped, [net])
    assert user_allows_ip(_u(deny=[net]), mapped) is False


def test_a_zoned_rule_is_stored_and_matched_without_its_zone():
    """Client addresses are compared without their IPv6 zone; a rule written with one was
    kept with it and never matched (the gateway's bans had the same flaw)."""
    assert canonical_cidr("fe80::1%eth0") == "fe80::1"
    alice = User(name="alice", home="/h", allow_cidrs=["fe80::1%eth0"])
    assert user_allows_ip(alice, "fe80::1") and user_allows_ip(alice, "fe80::1%eth1")
    assert not user_allows_ip(alice, "fe80::2")
