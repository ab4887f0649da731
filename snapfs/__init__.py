"""snapfs: a FUSE filesystem for file-level restore from virtual-machine backups."""

__version__ = "0.1.0"
