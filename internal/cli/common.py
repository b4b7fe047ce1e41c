"""Options and helpers shared by the `edgegw internal ...` commands."""
from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import click

from internal.home import HomeError, NodeHome

F = TypeVar("F", bound=Callable[..., Any])


def home_option(f: F) -> F:
    """`--home DIR` (or $EDGEGW_HOME): the node home every internal command works on."""
    return click.option(
        "--home", "home_dir", envvar="EDGEGW_HOME", required=True,
        type=click.Path(file_okay=False, path_type=str),
        help="Node home directory (created by `edgegw internal init`). Env: EDGEGW_HOME.",
    )(f)


def load_home(home_dir: str) -> NodeHome:
    try:
        return NodeHome.load(home_dir)
    except HomeError as exc:
        raise click.ClickException(str(exc)) from None


def default_workers() -> int:
    return os.cpu_count() or 1
