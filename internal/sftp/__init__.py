"""The node's SFTP server: confinement to the user's home, atomic uploads, quotas, audit."""
from __future__ import annotations

from internal.sftp.errors import sftp_error
from internal.sftp.paths import AccessDenied, Jail
from internal.sftp.quota import QuotaBook, QuotaExceeded, Usage
from internal.sftp.server import NodeSFTPServer
from internal.sftp.temps import sweep_temps
from internal.sftp.uploads import OpenFile, Upload

__all__ = ["AccessDenied", "Jail", "NodeSFTPServer", "OpenFile", "QuotaBook", "QuotaExceeded",
           "Upload", "Usage", "sftp_error", "sweep_temps"]
