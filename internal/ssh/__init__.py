"""The node's SSH layer: hardened algorithms, authentication policy, and the service that runs
asyncssh on relayed Data connections and direct listeners."""
from __future__ import annotations

from internal.session import SessionContext, SessionResult
from internal.ssh.service import Listener, SSHService

__all__ = ["Listener", "SSHService", "SessionContext", "SessionResult"]
