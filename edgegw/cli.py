"""The `edgegw` command: `serve` (gateway), `demo`, and `internal ...` (the node).

Each command's module is imported when that command runs, not before: the gateway in the DMZ
then loads none of the node's code (asyncssh, the store, password hashing), and starts in about
a third of the time.
"""
from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of its click command
_COMMANDS = {
    "serve": "edgegw.gateway.cli:serve",
    "demo": "edgegw.demo:demo",
    "internal": "internal.cli:internal",
}


class _LazyGroup(click.Group):
    """A group whose commands are imported on first use (`--help` lists them all)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command), target
        return cmd


@click.group(cls=_LazyGroup)
@click.version_option(package_name="edgegw")
def main() -> None:
    """edgegw: an SFTP edge gateway that holds no keys, credentials or files."""
