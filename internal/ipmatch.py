"""Per-user address rules: which client IPs may log in as a user.

Addresses are compared in canonical form, so a client seen as IPv4-mapped IPv6
(::ffff:192.0.2.1) matches IPv4 rules, and the other way round.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

from edgegw.netaddr import Address, Network, canonical_address, canonical_network
from internal.store.base import User

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4096)
def parse_cidr(text: str) -> Network:
    """`10.0.0.0/8`, `2001:db8::/32` or a single address (→ /32, /128); host bits are ignored."""
    raw = text.strip() if isinstance(text, str) else ""
    try:   # in the gateway's form: no zone, IPv4-mapped as IPv4
        return canonical_network(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR network "
                         "(examples: 192.0.2.7, 10.0.0.0/8, 2001:db8::/32)") from None


def canonical_cidr(text: str) -> str:
    """How a rule or ban is stored: `192.0.2.7` for one address, `10.0.0.0/8` for a network."""
    net = parse_cidr(text)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def parse_ip(ip: str) -> Address:
    """A client address in canonical form (zone id dropped, IPv4-mapped → IPv4); ValueError."""
    return canonical_address(str(ip).strip())


def banned_by(ip: str, cidrs: Iterable[str]) -> bool:
    """True when `ip` lies in one of the banned `cidrs`; an unparsable rule never matches.

    Fails closed, like Defender.banned: an unparsable `ip` counts as banned (so this is for ban
    lists only, never for an allow list; see user_allows_ip). None should
    arrive (the PNC codec and Data assignments carry valid addresses only), so this refuses no
    real client.
    """
    try:
        addr = parse_ip(ip)
    except ValueError:
        log.warning("treating unparsable client address %r as banned", ip)
        return True
    return any(addr in net for net in _networks(cidrs, strict=False))


def user_allows_ip(user: User, ip: str) -> bool:
    """May `user` log in from `ip`? Deny rules win; an empty allow list means any address.

    Fails closed: an unparsable client address or deny rule refuses the login.
    """
    try:
        addr = parse_ip(ip)
        deny = _networks(user.deny_cidrs, strict=True)
    except ValueError as exc:
        log.warning("refusing %s for user %s: %s", ip, user.name, exc)
        return False
    if any(addr in net for net in deny):
        return False
    if not user.allow_cidrs:
        return True
    return any(addr in net for net in _networks(user.allow_cidrs, strict=False))


def _networks(cidrs: Iterable[str], *, strict: bool) -> list[Network]:
    nets = []
    for text in cidrs:
        try:
            nets.append(parse_cidr(text))
        except ValueError:
            if strict:
                raise
            log.warning("ignoring invalid address rule %r", text)
    return nets
