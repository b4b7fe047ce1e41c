"""Liveness: a PNC peer is judged by how long our oldest unanswered Ping has waited."""
from __future__ import annotations

from edgegw.pnc.liveness import MAX_OUTSTANDING, SEQ_MASK, Liveness


def test_nothing_is_overdue_before_the_first_ping_or_once_all_are_answered() -> None:
    live = Liveness()
    assert live.overdue(100.0) == 0.0
    seq = live.ping(100.0)
    assert live.overdue(101.5) == 1.5
    assert live.pong(seq)
    assert live.overdue(500.0) == 0.0


def test_a_peer_that_answers_late_is_as_late_as_its_oldest_unanswered_ping() -> None:
    """A peer that reads at a trickle answers old Pings while new ones wait: it stays late."""
    live = Liveness()
    seqs = [live.ping(float(t)) for t in range(10)]
    assert live.answered_at == 0.0
    assert live.pong(seqs[2])                 # answers Pings 0..2
    assert live.overdue(10.0) == 7.0          # Ping 3, sent at 3, still waits
    assert live.answered_at == 2.0            # the other end's loop ran after 2.0
    assert live.pong(seqs[9])
    assert live.overdue(10.0) == 0.0
    assert live.answered_at == 9.0


def test_a_pong_for_no_ping_we_wait_for_changes_nothing() -> None:
    live = Liveness()
    first = live.ping(0.0)
    second = live.ping(1.0)
    assert not live.pong(second + 5)          # made up
    assert live.overdue(2.0) == 2.0
    assert live.pong(first)
    assert not live.pong(first)               # duplicated
    assert live.overdue(2.0) == 1.0


def test_sequence_numbers_wrap_like_the_wire_field() -> None:
    live = Liveness()
    live._seq = SEQ_MASK - 1
    assert live.ping(0.0) == SEQ_MASK
    assert live.ping(1.0) == 0
    assert live.pong(0)
    assert live.overdue(5.0) == 0.0


def test_unanswered_pings_kept_are_bounded_and_the_oldest_still_counts() -> None:
    live = Liveness()
    for t in range(MAX_OUTSTANDING * 4):
        live.ping(float(t))
    assert len(live._outstanding) == MAX_OUTSTANDING
    assert live.overdue(10_000.0) == 10_000.0


def test_pings_received_are_answered_once_by_the_newest() -> None:
    live = Liveness()
    assert live.answer() is None
    for seq in (7, 8, 9):
        live.pinged(seq)
    assert live.answer() == 9
    assert live.answer() is None
