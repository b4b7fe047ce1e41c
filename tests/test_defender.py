"""The defender on real stores, with a hand-driven clock."""
from __future__ import annotations

import pytest

from internal.defender import Defender
from internal.store import open_store


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _defender(store, clock, **kw) -> tuple[Defender, list, list]:
    bans: list = []
    unbans: list = []
    d = Defender(store, threshold=3, window=60, base_ban=100, max_ban=350, clock=clock,
                 on_ban=bans.append, on_unban=unbans.append, **kw)
    return d, bans, unbans


def test_threshold_bans_and_grows(store, clock):
    d, bans, _ = _defender(store, clock)
    assert d.record_failure("192.0.2.1") is None
    assert d.record_failure("192.0.2.1") is None
    assert d.banned("192.0.2.1") is None
    first = d.record_failure("::ffff:192.0.2.1")            # the same client, mapped
    assert first is not None and first.level == 1 and first.until == clock.now + 100
    assert d.banned("192.0.2.1") == first and bans == [first]
    assert d.banned("192.0.2.2") is None
    durations = []
    for _ in range(3):                                      # repeat offender: 200, then capped
        clock.now += 1000
        assert d.banned("192.0.2.1") is None
        for _ in range(3):
            entry = d.record_failure("192.0.2.1")
        durations.append(entry.until - clock.now)
    assert durations == [200, 350, 350]


def test_ban_levels_are_forgotten_after_a_quiet_period(store, clock):
    d, _, _ = _defender(store, clock, forget_after=5000)
    durations = []
    for gap in (1000, 1000, 6000, 1000):                    # the third ban comes after a
        for _ in range(3):                                  # quiet period: back to base_ban
            entry = d.record_failure("192.0.2.1")
        durations.append((entry.level, entry.until - clock.now))
        clock.now += gap
    assert durations == [(1, 100), (2, 200), (3, 350), (1, 100)]
    manual = d.add_ban("192.0.2.1", 50, "by hand")         # manual bans count as history too
    assert manual.level == 2
    with pytest.raises(ValueError, match="forget_after"):
        Defender(store, max_ban=100, forget_after=50)


def test_window_forgets_old_failures(store, clock):
    d, _, _ = _defender(store, clock)
    d.record_failure("192.0.2.1")
    d.record_failure("192.0.2.1")
    clock.now += 61
    assert d.record_failure("192.0.2.1") is None            # the first two aged out
    clock.now += 1
    assert d.record_failure("192.0.2.1") is None
    assert d.record_failure("192.0.2.1") is not None


def test_manual_bans_networks_and_removal(store, clock):
    d, bans, unbans = _defender(store, clock)
    net = d.add_ban("203.0.113.77/24", 3600, "abuse report")
    assert net.ip == "203.0.113.0/24" and bans == [net]
    assert d.banned("203.0.113.5") == net and d.banned("::ffff:203.0.113.5") == net
    assert d.banned("203.0.114.5") is None
    assert [b.ip for b in d.active_bans()] == ["203.0.113.0/24"]
    assert d.remove_ban("203.0.113.0/24") is True and unbans[-1].ip == "203.0.113.0/24"
    assert d.banned("203.0.113.5") is None
    assert d.remove_ban("203.0.113.0/24") is False
    with pytest.raises(ValueError):
        d.add_ban("not-an-ip", 10, "x")
    with pytest.raises(ValueError):
        d.add_ban("192.0.2.1", 0, "x")


def test_unparsable_address_is_refused(store, clock):
    d, _, _ = _defender(store, clock)
    assert d.banned("nonsense") is not None
    assert d.record_failure("nonsense") is None


def test_other_nodes_bans_are_seen_within_refresh(store_url, clock):
    a_store, b_store = open_store(store_url), open_store(store_url)
    try:
        a, _, _ = _defender(a_store, clock)
        b, b_bans, b_unbans = _defender(b_store, clock)
        assert b.banned("192.0.2.9") is None                 # cache loaded now
        for _ in range(3):
            a.record_failure("192.0.2.9")
        assert b.banned("192.0.2.9") is None                 # cached for refresh seconds
        clock.now += 1.5
        seen = b.banned("192.0.2.9")
        assert seen is not None and b_bans == [seen]
        a.remove_ban("192.0.2.9")
        clock.now += 1.5
        assert b.banned("192.0.2.9") is None and [u.ip for u in b_unbans] == ["192.0.2.9"]
    finally:
        a_store.close()
        b_store.close()


def test_failures_are_shared_between_nodes(store_url, clock):
    a_store, b_store = open_store(store_url), open_store(store_url)
    try:
        a, _, _ = _defender(a_store, clock)
        b, _, _ = _defender(b_store, clock)
        a.record_failure("192.0.2.3")
        b.record_failure("192.0.2.3")
        assert a.record_failure("192.0.2.3") is not None
    finally:
        a_store.close()
        b_store.close()


def test_store_outage_does_not_break_logins(store_url, clock, caplog):
    s = open_store(store_url)
    d, _, _ = _defender(s, clock)
    d.add_ban("192.0.2.1", 3600, "x")
    s.close()                                              # every store call now fails
    assert d.record_failure("192.0.2.50") is None
    clock.now += 5
    assert d.banned("192.0.2.1") is not None               # stale cache still protects
    assert "store error" in caplog.text and "keeping the cached" in caplog.text


def test_listener_errors_are_contained(store, clock):
    d = Defender(store, clock=clock, on_ban=lambda e: 1 / 0)
    got = []
    d.add_listener(on_ban=got.append)
    entry = d.add_ban("192.0.2.1", 10, "x")
    assert got == [entry]


def test_bad_settings():
    with pytest.raises(ValueError):
        Defender(None, threshold=0)
