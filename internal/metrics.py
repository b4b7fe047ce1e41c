"""What a node exposes at `edgegw internal serve --metrics HOST:PORT`.

The counts come from the audit trail as it is recorded (every login, session and file event
passes through `AuditLog.record`), plus the gateways each process is attached to. With
`--workers N` each worker process writes its values to files in a directory the supervisor
gives it (prometheus_client's multiprocess mode), and the supervisor serves their sum; a worker
that exits is marked dead so that its gauges leave the sum.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import multiprocess

log = logging.getLogger("edgegw.node.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"   # read by prometheus_client when it is imported

AUDIT_EVENTS = Counter("edgegw_node_audit_events", "Audit events recorded, by kind and result "
                       "(logins: ok, failed, refused, banned).", ["kind", "result"])
SESSIONS_ACTIVE = Gauge("edgegw_node_sessions_active", "Sessions running on the node.",
                        multiprocess_mode="livesum")
SESSION_BYTES = Counter("edgegw_node_session_bytes", "Bytes of finished sessions: in (from "
                        "clients, uploads) and out (to clients, downloads); file bytes for "
                        "SFTP sessions, bytes relayed with --forward.", ["direction"])
GATEWAYS_ATTACHED = Gauge("edgegw_node_gateways_attached",
                          "PNC links attached to a gateway (one per gateway per worker).",
                          multiprocess_mode="livesum")


def audit_event(kind: str, fields: Mapping[str, Any]) -> None:
    """Count one audit event (called by AuditLog.record for every event)."""
    result = _field(fields, "result")
    AUDIT_EVENTS.labels(kind, result if isinstance(result, str) else "").inc()
    if kind == "session.connect":
        SESSIONS_ACTIVE.inc()
    elif kind == "session.disconnect":
        SESSIONS_ACTIVE.dec()
        for direction in ("in", "out"):
            value = _field(fields, f"bytes_{direction}")
            if isinstance(value, int) and value > 0:
                SESSION_BYTES.labels(direction).inc(value)


def _field(fields: Mapping[str, Any], name: str) -> Any:
    """A field given by name or inside `detail` (where sessions put what is theirs)."""
    if name in fields:
        return fields[name]
    detail = fields.get("detail")
    return detail.get(name) if isinstance(detail, Mapping) else None


def multiprocess_registry(path: str) -> CollectorRegistry:
    """The supervisor's registry: the sum of what its workers wrote under `path`."""
    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def worker_exited(pid: int, path: str) -> None:
    """Take an exited worker's live gauges out of the sum (its counters stay counted)."""
    try:
        multiprocess.mark_process_dead(pid, path)
    except OSError as exc:
        log.warning("metrics files of worker pid %d not removed: %s", pid, exc)
