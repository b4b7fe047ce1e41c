"""Is the other end of a PNC link alive? It is while it answers our Pings. Sans-IO: the
Pings a link sends and answers, and how late the other end is with its answers.

Both ends ping at the heartbeat interval and answer each Ping with a Pong carrying its
sequence number. A link is judged by how long its oldest unanswered Ping has waited, not by
how long ago the peer last sent something: a peer that keeps sending but reads nothing (or
reads at the trickle the kernel lets through a full receive buffer) would otherwise look
alive for ever while none of our frames reach it.
"""
from __future__ import annotations

import collections

SEQ_MASK = (1 << 64) - 1     # Ping.seq is a U64 on the wire

# Unanswered Pings kept: past that the oldest alone says how late the peer is.
MAX_OUTSTANDING = 256


class Liveness:
    def __init__(self) -> None:
        self._seq = 0
        self._outstanding: collections.deque[tuple[int, float]] = collections.deque()
        self._answer: int | None = None     # the newest Ping received, not answered yet
        # When the newest Ping the other end answered was sent (the caller's clock): its loop
        # has run since then. 0.0 until one is answered.
        self.answered_at = 0.0

    def pinged(self, seq: int) -> None:
        """The other end sent Ping `seq`: answered by `answer()`, once for all received."""
        self._answer = seq

    def answer(self) -> int | None:
        """The seq for one Pong answering every Ping received since the last call (a peer
        flooding Pings gets one Pong per read, not one each); None when there is none."""
        seq, self._answer = self._answer, None
        return seq

    def ping(self, now: float) -> int:
        """The sequence number of the next Ping, sent at `now`."""
        self._seq = (self._seq + 1) & SEQ_MASK
        if len(self._outstanding) < MAX_OUTSTANDING:
            self._outstanding.append((self._seq, now))
        return self._seq

    def pong(self, seq: int) -> bool:
        """A Pong arrived: it answers that Ping and, frames being in order, every one before
        it. False when it answers none we are waiting for (stale, duplicated or made up)."""
        if not any(s == seq for s, _ in self._outstanding):
            return False
        while True:
            answered, sent = self._outstanding.popleft()
            if answered == seq:
                self.answered_at = sent
                return True

    def overdue(self, now: float) -> float:
        """Seconds the oldest unanswered Ping has waited; 0.0 when every one was answered."""
        return now - self._outstanding[0][1] if self._outstanding else 0.0


__all__ = ["Liveness"]
