"""Pieces the command-line modules share: error reporting, progress bars, sizes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from snapfs.errors import SnapfsError, SnapfsUserError


class UserError(click.ClickException):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        # click declares exit_code on the class; SnapfsUserError may ask for another one.
        self.exit_code = exit_code  # type: ignore[misc]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn snapfs errors into one-line click errors (no traceback)."""
    try:
        yield
    except SnapfsUserError as exc:
        raise UserError(str(exc), exc.exit_code) from None
    except SnapfsError as exc:
        raise UserError(exc.message) from None


@contextmanager
def progress_bars() -> Iterator[Callable[[str, float], None]]:
    """Rich progress bars on stderr, one per phase or disk; yields ``update(name, percent)``.

    Bars appear on the first report, so input errors found before copying starts print
    alone, without an empty bar.
    """
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        console=Console(stderr=True),
    )
    tasks: dict[str, TaskID] = {}

    def update(name: str, percent: float) -> None:
        if not tasks:
            progress.start()
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=100.0)
        progress.update(tasks[name], completed=percent)

    try:
        yield update
    finally:
        if tasks:
            progress.stop()


def human_size(n: int) -> str:
    """Binary units, like ``qemu-img info`` (disk sizes are powers of two)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
