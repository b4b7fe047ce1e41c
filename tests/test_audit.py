"""The audit writer against real stores, and against a store that fails for a while."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from internal.audit import AuditLog
from internal.store import AuditEvent, StoreError, open_store


def test_record_flush_query(store):
    log = AuditLog(store, "node-1")
    try:
        log.record("auth", username="alice", client_ip="192.0.2.1", client_port=40000,
                   session_id="ab" * 8, gateway="gw1", method="publickey", ok=True)
        log.record("file.close", username="alice", detail={"path": "/a"}, bytes=10)
        assert log.flush(5.0)
    finally:
        log.close()
    events = store.query_audit(username="alice")
    assert [e.kind for e in events] == ["auth", "file.close"]
    assert events[0].node_id == "node-1" and events[0].client_port == 40000
    assert events[0].detail == {"method": "publickey", "ok": True}
    assert events[1].detail == {"path": "/a", "bytes": 10}


def test_odd_fields_never_raise(store):
    log = AuditLog(store, "n")
    log.record("x", client_port="not-a-port", ts="yesterday", detail="text", obj=object())
    log.record("y", username=None, client_ip=123)
    log.close()
    x, y = store.query_audit()
    assert x.client_port == 0 and x.detail["client_port"] == "'not-a-port'"
    assert x.detail["detail"] == "text" and x.ts > 0
    assert y.username == "" and y.client_ip == "123"


def test_values_the_store_refuses_do_not_wedge_the_trail(store):
    """Each of these made the store refuse the batch (integer overflow, NOT NULL time, NUL in
    PostgreSQL text, unencodable text, keys sort_keys cannot order) at every retry: the
    writer retried for ever and no later event was ever stored."""
    log = AuditLog(store, "n", max_backoff=0.1)
    try:
        log.record("port", client_port=2**64)
        log.record("nan", ts=float("nan"))
        log.record("nul", username="a\x00b", gateway="g\x00")
        log.record("surrogate", session_id="\udcff", client_ip="\ud800")
        log.record("keys", detail={1: "one", "b": 2})
        log.record("after")
        assert log.flush(5.0)
    finally:
        log.close(timeout=1.0)
    events = {e.kind: e for e in store.query_audit()}
    assert list(events) == ["port", "nan", "nul", "surrogate", "keys", "after"]
    assert events["port"].client_port == 0 and events["port"].detail["client_port"] == str(2**64)
    assert events["nan"].ts > 0 and events["nul"].username == "a\\x00b"
    assert events["surrogate"].session_id == "\\udcff"
    assert events["keys"].detail == {"1": "one", "b": 2}


def test_events_survive_close_in_order(store):
    log = AuditLog(store, "n")
    for i in range(1200):                       # more than one batch
        log.record("seq", i=i)
    log.close()
    assert [e.detail["i"] for e in store.query_audit(kind="seq", limit=5000)] == list(range(1200))


async def test_record_does_not_block_the_loop(store):
    slow = _Flaky(store, fail_times=0, delay=0.5)
    log = AuditLog(slow, "n")
    try:
        t0 = time.monotonic()
        for i in range(100):
            log.record("fast", i=i)
            await asyncio.sleep(0)
        assert time.monotonic() - t0 < 0.4
        assert await asyncio.to_thread(log.flush, 10.0)
    finally:
        log.close()
    assert len(store.query_audit(kind="fast")) == 100


class _Flaky:
    """Wraps a store: the first `fail_times` writes fail, each write takes `delay`."""

    def __init__(self, inner, fail_times: int, delay: float = 0.0) -> None:
        self.inner, self.fail_times, self.delay, self.calls = inner, fail_times, delay, 0

    def append_audit(self, events: list[AuditEvent]) -> None:
        self.calls += 1
        time.sleep(self.delay)
        if self.calls <= self.fail_times:
            raise StoreError("database is down")
        self.inner.append_audit(events)


def test_store_failure_is_logged_and_retried(store, caplog):
    flaky = _Flaky(store, fail_times=3)
    log = AuditLog(flaky, "n", max_backoff=0.2)
    with caplog.at_level(logging.ERROR, logger="internal.audit"):
        log.record("kept", n=1)
        assert log.flush(10.0)
        log.close()
    assert flaky.calls == 4
    assert [e.kind for e in store.query_audit()] == ["kept"]
    assert "retrying" in caplog.text and "database is down" in caplog.text


def test_close_with_dead_store_logs_every_event(sqlite_url, caplog):
    flaky = _Flaky(open_store(sqlite_url), fail_times=10**9)
    log = AuditLog(flaky, "n", max_backoff=0.05)
    with caplog.at_level(logging.ERROR, logger="internal.audit"):
        log.record("lost?", username="alice", path="/secret-plan.txt")
        assert not log.flush(0.3)
        log.close(timeout=0.3)
    assert "unstored audit event" in caplog.text and "/secret-plan.txt" in caplog.text
    log.record("after-close")                     # logged, not raised
    assert "after close" in caplog.text
    flaky.inner.close()


def test_many_threads_record(store):
    log = AuditLog(store, "n")
    threads = [threading.Thread(target=lambda t=t: [log.record("t", t=t, i=i) for i in range(50)])
               for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    assert len(store.query_audit(kind="t", limit=1000)) == 400


def test_events_close_together_share_a_commit(store):
    """Sessions arriving back to back must not pay one commit (one fsync) per event."""
    counting = _Flaky(store, fail_times=0)
    log = AuditLog(counting, "n")
    try:
        for i in range(40):
            log.record("burst", i=i)
            time.sleep(0.0002)              # events 0.2 ms apart, as in a connection burst
        assert log.flush(5.0)
    finally:
        log.close()
    assert len(store.query_audit(kind="burst")) == 40
    assert counting.calls <= 10, counting.calls
