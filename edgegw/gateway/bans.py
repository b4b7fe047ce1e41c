"""Addresses the nodes asked the gateway to drop at accept time, until their bans expire.

Every external accept asks, so a lookup must not grow with the table: single addresses (nearly
all bans: the defender bans hosts) are a dict keyed by the address, and only the few network
bans are scanned. Expired bans leave through a heap ordered by expiry, a few per lookup.
"""
from __future__ import annotations

import heapq
import itertools
import time

from edgegw.netaddr import Address, Network, canonical_address, canonical_network

# Entries are normalized as lookups normalize addresses (no zone, IPv4-mapped as IPv4):
# otherwise fe80::1%eth0 or ::ffff:a.b.c.d would be stored in a form no lookup ever asks for.
_Key = Address | Network


def _key(net: Network) -> _Key:
    """A single address (/32, /128) is keyed by the address itself."""
    return net.network_address if net.prefixlen == net.max_prefixlen else net


class BanTable:
    def __init__(self) -> None:
        self._hosts: dict[Address, float] = {}      # single addresses: one lookup
        self._networks: dict[Network, float] = {}   # CIDR bans only: scanned per lookup
        self._expiry: list[tuple[float, int, _Key]] = []   # may hold stale entries
        self._seq = itertools.count()   # ties on expiry never compare keys

    def add(self, ip_or_cidr: str, until: float) -> None:
        key = _key(canonical_network(ip_or_cidr))
        until = max(until, self._until(key))
        if isinstance(key, Network):
            self._networks[key] = until
        else:
            self._hosts[key] = until
        heapq.heappush(self._expiry, (until, next(self._seq), key))
        if len(self._expiry) > 2 * len(self) + 64:   # extended or lifted bans left stale ones
            self._expiry = [(t, next(self._seq), k) for k, t in
                            itertools.chain(self._hosts.items(), self._networks.items())]
            heapq.heapify(self._expiry)

    def remove(self, ip_or_cidr: str) -> bool:
        key = _key(canonical_network(ip_or_cidr))
        if isinstance(key, Network):
            return self._networks.pop(key, None) is not None
        return self._hosts.pop(key, None) is not None

    def banned(self, ip: str, now: float | None = None) -> bool:
        if not self._hosts and not self._networks:
            return False
        now = time.time() if now is None else now
        self._expire(now)
        addr = canonical_address(ip)
        if self._hosts.get(addr, 0.0) > now:
            return True
        return any(addr.version == net.version and addr in net and until > now
                   for net, until in self._networks.items())

    def _until(self, key: _Key) -> float:
        if isinstance(key, Network):
            return self._networks.get(key, 0.0)
        return self._hosts.get(key, 0.0)

    def _expire(self, now: float) -> None:
        """Forget the bans that expired by `now`; a heap entry a later add() superseded, or
        whose ban was lifted, is dropped without touching the table."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            until, _, key = heapq.heappop(heap)
            if self._until(key) == until:
                if isinstance(key, Network):
                    del self._networks[key]
                else:
                    del self._hosts[key]

    def __len__(self) -> int:
        return len(self._hosts) + len(self._networks)
