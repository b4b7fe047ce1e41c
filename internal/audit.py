"""The audit trail writer: SFTP handlers record events without waiting for the database.

`record()` only appends to a queue; one background thread writes batches with `append_audit`.
When the store fails, the batch is kept and retried with backoff, and the failure is logged, so
an outage delays the trail but does not lose it. `close()` (also run at interpreter exit) writes
what is still queued.
"""
from __future__ import annotations

import atexit
import collections
import json
import logging
import math
import threading
import time
from dataclasses import fields as dc_fields
from typing import Any

from internal import metrics
from internal.store.base import AuditEvent, Store

log = logging.getLogger(__name__)

BATCH = 500
GROUP_WINDOW = 0.005    # seconds the writer lets a batch gather: back-to-back sessions then
                        # share one commit (one fsync) instead of paying one each
MAX_QUEUE = 1_000_000          # ~0.5 GB of events: past this, drops are counted and logged
_FIELDS = {f.name for f in dc_fields(AuditEvent)} - {"kind", "detail", "id", "node_id"}


class AuditLog:
    def __init__(self, store: Store, node_id: str, *, max_backoff: float = 5.0) -> None:
        self.store = store
        self.node_id = node_id
        self._max_backoff = max_backoff
        self._queue: collections.deque[AuditEvent] = collections.deque()
        self._cond = threading.Condition()
        self._queued = 0        # events accepted so far
        self._written = 0       # events the store has confirmed
        self._dropped = 0
        self._closing = False
        self._abandon = False   # close() timed out: the writer stops, close() logs the rest
        self._thread = threading.Thread(target=self._run, name="edgegw-audit", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def record(self, kind: str, **fields: Any) -> None:
        """Queue one event; known AuditEvent fields by name, anything else goes to `detail`."""
        try:
            metrics.audit_event(kind, fields)   # before _event() takes the fields apart
        except Exception:
            log.exception("cannot count audit event %r", kind)
        try:
            event = self._event(kind, fields)
            with self._cond:
                if self._closing:
                    log.error("audit event after close, not stored: %s", _describe(event))
                    return
                if len(self._queue) >= MAX_QUEUE:
                    self._dropped += 1
                    if self._dropped == 1 or self._dropped % 10_000 == 0:
                        log.error("audit queue full (store down?): %d events dropped so far",
                                  self._dropped)
                    return
                self._queue.append(event)
                self._queued += 1
                if len(self._queue) == 1:   # the writer only ever waits on an empty queue
                    self._cond.notify_all()
        except Exception:   # the trail must never break the session that records it
            log.exception("cannot record audit event %r", kind)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything recorded so far is in the store; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._queued
            while self._written < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    log.warning("audit flush: %d events not yet stored", target - self._written)
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (waiting up to `timeout`), then stop the writer."""
        atexit.unregister(self.close)
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return
        with self._cond:
            self._abandon = True
            self._cond.notify_all()
            left = list(self._queue)
        log.error("audit log closed with %d events not stored (store unavailable); "
                  "they follow, one per line", len(left))
        for event in left:
            log.error("unstored audit event: %s", _describe(event))

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _event(self, kind: str, extra: dict[str, Any]) -> AuditEvent:
        known = {k: extra.pop(k) for k in list(extra) if k in _FIELDS}
        # Whatever the fields hold, the event must be one the store takes: a value it refuses
        # (a port beyond its integer column, NaN for a NOT NULL time, NUL in PostgreSQL text,
        # a key json.dumps(sort_keys=True) cannot order) fails the whole batch at every retry,
        # and the writer, retrying it for ever, stores no event after it.
        given = extra.pop("detail", None)
        detail = dict(given) if isinstance(given, dict) else {} if given is None else {"detail": given}
        detail.update(extra)
        detail = {str(k): v for k, v in detail.items()}
        ts = _number(known.pop("ts", None), float)
        if not ts or not math.isfinite(ts):
            ts = time.time()
        raw_port = known.pop("client_port", 0)
        port = _number(raw_port, int)
        if port is None or not 0 <= port <= 65535:
            detail["client_port"] = repr(raw_port)
            port = 0
        texts: dict[str, Any] = {k: _text(v) for k, v in known.items()}   # the str fields
        return AuditEvent(kind=_text(kind), node_id=self.node_id, detail=detail, ts=ts,
                          client_port=port, **texts)

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return                              # closing and drained
                gather = not self._closing and len(self._queue) < BATCH
            if gather:
                time.sleep(GROUP_WINDOW)
            with self._cond:
                batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
            try:
                self.store.append_audit(batch)
            except Exception as exc:
                log.error("audit store write failed (%d events kept, retrying in %.1fs): %s",
                          len(batch), backoff, exc)
                with self._cond:
                    if not self._abandon:
                        self._cond.wait(backoff)
                    if self._abandon:
                        return
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = 0.1
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                self._written += len(batch)
                self._cond.notify_all()


def _number(value: Any, kind: type) -> Any:
    try:
        return kind(value or 0)
    except (TypeError, ValueError, OverflowError):
        return None


def _text(value: Any) -> str:
    """A column's text as every store takes it: no NUL (PostgreSQL refuses it), no lone
    surrogate (not encodable as UTF-8); both kept visible as escapes."""
    if value is None:
        return ""
    text = str(value).replace("\0", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _describe(event: AuditEvent) -> str:
    return json.dumps({"kind": event.kind, "ts": event.ts, "user": event.username,
                       "ip": event.client_ip, "session": event.session_id,
                       "detail": event.detail}, default=str)
