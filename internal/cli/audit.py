"""Placeholder: `edgegw internal audit` is being written."""
import click


@click.command(name="audit")
def audit() -> None:
    """(not yet available)"""
