"""Placeholder: `edgegw internal ban` is being written."""
import click


@click.group(name="ban")
def ban() -> None:
    """(not yet available)"""
