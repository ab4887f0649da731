"""``python -m snapfs`` runs the command line."""

from snapfs.cli import main

main()
