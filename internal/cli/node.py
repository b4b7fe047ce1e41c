"""`edgegw internal init|serve|drain`."""
from __future__ import annotations

import click

from internal.cli.common import home_option, load_home
from internal.home import HomeError, NodeHome


@click.command()
@home_option
@click.option("--db", "db_url", default=None, help="Store URL (default: SQLite in the home).")
@click.option("--node-id", default=None, help="Name of this node in logs and the audit trail.")
def init(home_dir: str, db_url: str | None, node_id: str | None) -> None:
    """Create a node home: SSH host keys, PNC certificate, store, gateway-trust.pem."""
    try:
        home = NodeHome.init(home_dir, db_url=db_url, node_id=node_id)
    except HomeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"initialised {home.path} (node {home.node_id})")
    click.echo(f"copy {home.trust_file} to the gateway and pass it as --trust")


COMMANDS = [init]
