"""`edgegw internal ...`: the internal node's commands, one module per command group."""
from __future__ import annotations

import click

from internal.cli import audit, bans, hostkey, node, users


@click.group(name="internal")
def internal() -> None:
    """The internal node: runs on the trusted network and dials out to gateways."""


for _cmd in (*node.COMMANDS, users.user, bans.ban, audit.audit, hostkey.hostkey):
    internal.add_command(_cmd)
