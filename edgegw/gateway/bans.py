"""Addresses the nodes asked the gateway to drop at accept time, until their bans expire."""
from __future__ import annotations

import ipaddress
import time

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BanTable:
    def __init__(self) -> None:
        self._bans: dict[Network, float] = {}

    def add(self, ip_or_cidr: str, until: float) -> None:
        net = ipaddress.ip_network(ip_or_cidr, strict=False)
        self._bans[net] = max(until, self._bans.get(net, 0.0))

    def remove(self, ip_or_cidr: str) -> bool:
        return self._bans.pop(ipaddress.ip_network(ip_or_cidr, strict=False), None) is not None

    def banned(self, ip: str, now: float | None = None) -> bool:
        if not self._bans:
            return False
        now = time.time() if now is None else now
        addr = ipaddress.ip_address(ip)
        hit = False
        for net, until in list(self._bans.items()):
            if until <= now:
                del self._bans[net]     # forget expired bans lazily
            elif addr.version == net.version and addr in net:
                hit = True
        return hit

    def __len__(self) -> int:
        return len(self._bans)
