"""Addresses as operators write them: HOST:PORT, [IPv6]:PORT, CIDR lists."""
from __future__ import annotations

import codecs
import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str, *, default_host: str = "") -> HostPort:
    """Parse `HOST:PORT`, `[V6]:PORT` or `:PORT`; ValueError names what was wrong."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    host = host or default_host
    if not host:
        raise ValueError(f"{text!r}: missing host")
    _check_host(text, host)
    # int() alone takes '+22', ' 22', '1_0' and non-ASCII digits such as '２２'
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    if len(port_text.lstrip("0")) > 5 or int(port_text) > 65535:
        raise ValueError(f"{text!r}: port {port_text} is out of range 0-65535")
    return HostPort(host, int(port_text))


def _check_host(text: str, host: str) -> None:
    """A name the resolver can take: getaddrinfo encodes it with the 'idna' codec and raises
    UnicodeError (not OSError) for an empty label, one over 63 characters or a bad character,
    which would surface as a traceback or end a redial loop."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:  # the codec itself: str.encode wraps its reason in "encoding with ... failed (...)"
        codecs.lookup("idna").encode(host)
    except UnicodeError as exc:
        raise ValueError(f"{text!r}: {host!r} is not a valid host name ({exc})") from None


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_in_networks(ip: str, nets: tuple[Network, ...] | list[Network]) -> bool:
    addr = canonical_address(ip)
    return any(addr.version == net.version and addr in net for net in nets)


def parse_networks(items: list[str] | tuple[str, ...]) -> tuple[Network, ...]:
    nets = []
    for item in items:
        try:
            # as addresses are compared: no zone, IPv4-mapped as IPv4 (else it never matches)
            nets.append(canonical_network(item.strip()))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)") from None
    return tuple(nets)


def canonical_address(ip: str) -> Address:
    """An address as the gateway compares it: without an IPv6 zone (%eth0), and IPv4-mapped
    IPv6 (::ffff:a.b.c.d) as plain IPv4."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr


def canonical_network(ip_or_cidr: str) -> Network:
    """A network in the form canonical_address's addresses are matched against: without a
    zone (a zoned address never equals the zoneless one a lookup uses), and an IPv4-mapped
    network of /96 or longer as the IPv4 network."""
    net = ipaddress.ip_network(ip_or_cidr, strict=False)
    if isinstance(net, ipaddress.IPv6Network):
        mapped = net.network_address.ipv4_mapped
        if mapped is not None and net.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
        net = ipaddress.IPv6Network((int(net.network_address), net.prefixlen))  # drops the zone
    return net


def normalize_ip(ip: str) -> str:
    """Canonical text of an address (see canonical_address)."""
    return str(canonical_address(ip))
