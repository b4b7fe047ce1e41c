"""The `edgegw` command: `serve` (gateway), `demo`, and `internal ...` (the node).

Each command's module is imported when that command runs, not before: the gateway in the DMZ
then loads none of the node's code (asyncssh, the store, password hashing), and starts in about
a third of the time.
"""
from __future__ import annotations

import click

from edgegw.lazycli import LazyGroup


@click.group(cls=LazyGroup, lazy={
    "serve": "edgegw.gateway.cli:serve",
    "demo": "edgegw.demo:demo",
    "internal": "internal.cli:internal",
})
@click.version_option(package_name="edgegw")
def main() -> None:
    """edgegw: an SFTP edge gateway that holds no keys, credentials or files."""
