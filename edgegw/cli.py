"""The `edgegw` command: `serve` (gateway), `demo`, and `internal ...` (the node)."""
from __future__ import annotations

import click

from edgegw.demo import demo
from edgegw.gateway.cli import serve
from internal.cli import internal


@click.group()
@click.version_option(package_name="edgegw")
def main() -> None:
    """edgegw: an SFTP edge gateway that holds no keys, credentials or files."""


main.add_command(serve)
main.add_command(demo)
main.add_command(internal)
