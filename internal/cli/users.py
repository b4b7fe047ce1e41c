"""Placeholder: `edgegw internal user` is being written."""
import click


@click.group(name="user")
def user() -> None:
    """(not yet available)"""
