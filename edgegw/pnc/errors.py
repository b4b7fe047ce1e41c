"""PNC errors, split by blame so that a driver knows whom to log and what to close.

`LocalProtocolError`: our own code misused the API (wrong event for the role or state, a field
out of range). Nothing was written; the connection is unchanged and the caller has a bug to fix.

`RemoteProtocolError`: the peer sent something malformed or out of order. The connection is dead;
the driver logs the message and closes the socket. Every malformed input ends in this error and
in nothing else.
"""
from __future__ import annotations


class ProtocolError(Exception):
    """Base of both PNC errors; catch the subclasses, which say whose fault it was."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; close the connection."""


__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]
