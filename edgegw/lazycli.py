"""A click group whose commands are imported when one of them runs: a command then loads its
own code only (`edgegw serve` none of the node's, `edgegw internal user` not the node's server).
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import click


class LazyGroup(click.Group):
    """`lazy` maps a command name to "module:attribute" of its click command; `--help` lists
    them all (and imports them to show their help lines)."""

    def __init__(self, *args: Any, lazy: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self._lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attr = target.partition(":")
        cmd = getattr(importlib.import_module(module), attr)
        if not isinstance(cmd, click.Command):
            raise TypeError(f"{target} is not a click command")
        return cmd
