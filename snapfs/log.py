"""Logging set-up for the command line and the mount daemon."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(*, debug: bool = False, logfile: Path | None = None) -> None:
    """Log to stderr (foreground) or to ``logfile`` (background daemon)."""
    handler: logging.Handler
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(logfile)
    else:
        handler = logging.StreamHandler(sys.stderr)
    # The daemon's log outlives days: full date there; milliseconds everywhere (a launch's
    # steps are tens of milliseconds apart).
    datefmt = "%Y-%m-%d %H:%M:%S" if logfile is not None else "%H:%M:%S"
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", datefmt
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
