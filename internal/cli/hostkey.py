"""Placeholder: `edgegw internal hostkey` is being written."""
import click


@click.group(name="hostkey")
def hostkey() -> None:
    """(not yet available)"""
