"""`edgegw internal ...`: the internal node's commands, one module per command group, each
imported when its command runs (the admin commands do not load the node's server)."""
from __future__ import annotations

import click

from edgegw.lazycli import LazyGroup


@click.group(name="internal", cls=LazyGroup, lazy={
    "init": "internal.cli.node:init",
    "serve": "internal.cli.node:serve",
    "drain": "internal.cli.node:drain",
    "ca": "internal.cli.node:ca",
    "user": "internal.cli.users:user",
    "ban": "internal.cli.bans:ban",
    "audit": "internal.cli.audit:audit",
    "hostkey": "internal.cli.hostkey:hostkey",
})
def internal() -> None:
    """The internal node: runs on the trusted network and dials out to gateways."""
