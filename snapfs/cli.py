"""The ``snapfs`` command line (click): mount, umount, ls and the repo commands."""

from __future__ import annotations

import click


@click.group()
@click.version_option()
def cli() -> None:
    """snapfs: browse and restore virtual-machine backups as a filesystem."""


def main() -> None:
    cli()
