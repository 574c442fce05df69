"""`graft config`: where the preload library and the C header are installed."""
from __future__ import annotations

import click

from sockgraft.modes.preload.attach import include_dir, preload_lib


@click.group(name="config")
def config() -> None:
    """Where the preload library and the C header are installed."""


@config.command(name="include-dir")
def _include_dir() -> None:
    """Print the directory holding graft.h (for cc -I)."""
    click.echo(include_dir())


@config.command(name="preload-lib")
def _preload_lib() -> None:
    """Print the path of libgraft-hijack.so (for LD_PRELOAD)."""
    click.echo(preload_lib())

