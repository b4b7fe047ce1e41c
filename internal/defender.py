"""Brute-force defence: ban addresses that keep failing to log in, longer each time (an
address with no ban for `forget_after` seconds starts over at the shortest ban).

Failures and bans live in the store, so nodes sharing a PostgreSQL store count together and see
each other's bans. `banned()` answers from a cache refreshed at most every `refresh` seconds,
which is what keeps it cheap on every connection offer. Listeners hear about bans made here and
about bans that appeared or vanished in the store (other nodes, the CLI), so the node can push
them to its gateways. Listeners run in the calling thread; async code should hop back to its
loop with `call_soon_threadsafe`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from internal.ipmatch import Network, canonical_cidr, parse_cidr, parse_ip
from internal.store.base import BanEntry, Store, StoreError

log = logging.getLogger(__name__)

Listener = Callable[[BanEntry], None]


class Defender:
    def __init__(self, store: Store, *, threshold: int = 5, window: float = 300.0,
                 base_ban: float = 600.0, max_ban: float = 7 * 86400,
                 forget_after: float = 30 * 86400,
                 on_ban: Listener | None = None, on_unban: Listener | None = None,
                 refresh: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        if threshold < 1 or window <= 0 or base_ban <= 0 or max_ban < base_ban \
                or forget_after < max_ban:
            raise ValueError("defender: need threshold >= 1, window > 0, "
                             "0 < base_ban <= max_ban <= forget_after")
        self.store = store
        self.threshold = threshold
        self.window = window
        self.base_ban = base_ban
        self.max_ban = max_ban
        self.forget_after = forget_after    # an address not banned for this long starts over
        self.refresh_every = refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._bans: dict[Network, BanEntry] = {}
        self._loaded_at = float("-inf")
        self._last_prune = clock()
        self._on_ban: list[Listener] = []
        self._on_unban: list[Listener] = []
        self.add_listener(on_ban, on_unban)

    def add_listener(self, on_ban: Listener | None = None,
                     on_unban: Listener | None = None) -> None:
        if on_ban:
            self._on_ban.append(on_ban)
        if on_unban:
            self._on_unban.append(on_unban)

    def ban_duration(self, level: int) -> float:
        """base_ban doubled for each earlier ban, capped at max_ban."""
        return min(self.max_ban, self.base_ban * 2.0 ** min(max(level - 1, 0), 64))

    def record_failure(self, ip: str) -> BanEntry | None:
        """Count one failed login; returns the ban when this failure crossed the threshold.

        The `threshold`-th failure within `window` seconds bans the address. Store trouble is
        logged and reported as "no ban": a broken database must not break logins.
        """
        try:
            addr = str(parse_ip(ip))
        except ValueError:
            log.warning("defender: ignoring failure from unparsable address %r", ip)
            return None
        now = self._clock()
        try:
            self.store.record_auth_failure(addr, now)
            self._maybe_prune(now)
            if self.store.count_auth_failures(addr, now - self.window) < self.threshold:
                return None
            since = now - self.forget_after
            level = self.store.ban_level(addr, since) + 1
            entry = self.store.add_ban(addr, now + self.ban_duration(level),
                                       f"{self.threshold} failed logins in {self.window:g}s",
                                       history_since=since, at=now)
            self.store.clear_auth_failures(ip=addr)
        except StoreError as exc:
            log.error("defender: store error while counting %s: %s", addr, exc)
            return None
        log.warning("defender: banned %s for %.0fs (level %d)", addr, entry.until - now,
                    entry.level)
        self._remember(entry)
        return entry

    def banned(self, ip: str) -> BanEntry | None:
        """The active ban covering `ip`, if any (an unparsable address counts as banned)."""
        try:
            addr = parse_ip(ip)
        except ValueError:
            return BanEntry(ip=str(ip), until=float("inf"), reason="unparsable address",
                            created_at=0.0)
        self.refresh(force=False)
        now = self._clock()
        with self._lock:
            for net, entry in self._bans.items():
                if entry.until > now and addr.version == net.version and addr in net:
                    return entry
        return None

    def add_ban(self, ip_or_cidr: str, duration: float, reason: str) -> BanEntry:
        """Ban an address or network by hand (ValueError for bad input, StoreError)."""
        key = canonical_cidr(ip_or_cidr)
        if not duration > 0:
            raise ValueError(f"ban duration must be positive, not {duration!r}")
        now = self._clock()
        entry = self.store.add_ban(key, now + duration, reason,
                                   history_since=now - self.forget_after, at=now)
        self._remember(entry)
        return entry

    def remove_ban(self, ip: str) -> bool:
        """Lift a ban (address or network as it was banned); False if there was none."""
        key = canonical_cidr(ip)
        removed = self.store.remove_ban(key)
        with self._lock:
            entry = self._bans.pop(parse_cidr(key), None)
        if removed:
            now = self._clock()
            self._notify(self._on_unban, entry or BanEntry(key, now, "removed", now))
        return removed

    def active_bans(self) -> list[BanEntry]:
        self.refresh(force=False)
        now = self._clock()
        with self._lock:
            return sorted((e for e in self._bans.values() if e.until > now), key=lambda e: e.ip)

    def refresh(self, force: bool = True) -> None:
        """Reload bans from the store (other nodes, the CLI) and tell listeners what changed."""
        now = self._clock()
        with self._lock:
            if not force and now - self._loaded_at < self.refresh_every:
                return
            self._loaded_at = now
        try:
            fresh = {parse_cidr(e.ip): e for e in self.store.active_bans(now)}
        except (StoreError, ValueError) as exc:
            log.error("defender: cannot refresh bans, keeping the cached ones: %s", exc)
            return
        with self._lock:
            old, self._bans = self._bans, fresh
        for net, entry in fresh.items():
            if old.get(net) != entry:
                self._notify(self._on_ban, entry)
        for net, entry in old.items():
            if net not in fresh:
                self._notify(self._on_unban, entry)

    def _remember(self, entry: BanEntry) -> None:
        with self._lock:
            self._bans[parse_cidr(entry.ip)] = entry
        self._notify(self._on_ban, entry)

    def _maybe_prune(self, now: float) -> None:
        if now - self._last_prune < self.window:
            return
        self._last_prune = now
        self.store.clear_auth_failures(before=now - self.window)

    def _notify(self, listeners: list[Listener], entry: BanEntry) -> None:
        for fn in list(listeners):
            try:
                fn(entry)
            except Exception:
                log.exception("defender: ban listener %r failed", fn)
