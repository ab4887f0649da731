"""Mount settings: defaults, the TOML settings file, and validation. No I/O beyond reading.

The settings file is ``$SNAPFS_CONFIG`` or ``~/.config/snapfs/config.toml`` (or ``--config``),
one table per subsystem::

    [nbd]
    connections = 4        # libnbd connections per image
    idle_timeout = 60      # seconds a server with no open files stays up
    read_ahead_kb = 1024   # the mount's kernel read-ahead (0: leave the kernel default)
    read_around_kb = 256   # a random read of a snapshot disk reads this window (0: off)
    store_ahead_kb = 16384 # pages stored this far ahead of a sequential reader (0: off)
    store_threads = 4      # threads putting read-around and store-ahead pages in the cache
    store_process = true   # store-ahead from a process of its own (snapfs.storeproc)
    store_data = true      # that process also reads data ahead, over its own NBD connections
    page_cache = true      # false: disk images are read without the kernel's page cache

    [guestfs]                  # see snapfs/guestfs/settings.py
    backend = "auto"           # auto | kvm | tcg (auto: KVM, and TCG if KVM hangs or fails)
    launch_timeout_s = 300     # a TCG launch that takes longer is killed: EIO
    kvm_launch_timeout_s = 60  # a KVM launch that takes longer is killed, then TCG is tried
    max_appliances = 4         # live appliances at once; the least recently used is shut down
    idle_timeout_s = 300       # seconds an unused appliance stays up
    memsize_mb = 768
    fast_boot = true           # boot an uncompressed copy of the appliance kernel (PVH)

    [libvirt]                  # remote libvirt URIs (docs/sources.md, "Remote libvirt hosts")
    nbd_port = 10809           # first TCP port tried for a pull-mode job's NBD server
    nbd_ports = 100            # how many ports from nbd_port may be tried
    tls = true                 # require TLS (nbds://) for remote jobs
    tls_certificates = ""      # client directory: ca-cert.pem, client-cert.pem, client-key.pem
    scratch_dir = ""           # on the libvirt host; "" = beside each disk image
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from snapfs.errors import SnapfsUserError
from snapfs.guestfs.settings import GuestfsSettings


@dataclass(frozen=True)
class NbdSettings:
    # Several connections let qemu-nbd serve requests of different readers in parallel;
    # each is pipelined (AIO), so a handful is enough.
    connections: int = 4
    # Servers with no open file stop after this; the page cache keeps what was read.
    idle_timeout: float = 60.0
    # FUSE reads arrive as 128 KiB requests by default; 1 MiB makes sequential reads ~3x
    # faster here (see docs/benchmarks.md). Applied to this mount's bdi only, where writable.
    read_ahead_kb: int = 1024
    # A random read of a snapshot disk smaller than this is served by reading the aligned
    # window around it, whose rest goes into the page cache (snapfs.readaround): nearby
    # reads then never reach the daemon. 0 turns it off.
    read_around_kb: int = 256
    # A sequential reader of a snapshot disk gets the pages this far ahead of its requests
    # put into the page cache (zeros for holes; data read by the store process), in
    # parallel with the loop's replies (snapfs.readaround). 0 turns it off.
    store_ahead_kb: int = 16384
    # Threads that put those pages into the page cache: the store process's, and the
    # daemon's own (read-around windows; holes when the process cannot take them). The
    # process's threads each wait for one NBD read at a time: 2 fell behind the reader, 4
    # kept ahead of it (measured, docs/benchmarks.md session 9).
    store_threads: int = 4
    # Store-ahead from a helper process (snapfs.storeproc) with ``store_threads``
    # threads of its own interpreter: pyfuse3 writes replies with the GIL held, so the
    # daemon's own store threads fall behind the loop's reply copies. False: daemon threads.
    store_process: bool = True
    # The store process also stores data ahead of sequential readers, read over NBD
    # connections of its own (snapshot disks of snapfs's own qemu-nbd only): the daemon's
    # loop then answers only the page per gap left to the kernel (snapfs.readaround).
    store_data: bool = True
    # Snapshot disk images go through the kernel's page cache: a second read, and random
    # reads near earlier ones (read-around), never reach the daemon. False opens them with
    # FOPEN_DIRECT_IO: each read is one request answered straight into the reader's buffer,
    # with no page-cache pages to fill. A whole-disk copy of a sparse image then runs
    # about 2x faster here and evicts nothing, but every read reaches the daemon: random
    # reads of data lose read-around (docs/design.md, "Reads without the page cache").
    page_cache: bool = True


@dataclass(frozen=True)
class LibvirtSettings:
    """Pull-mode jobs of remote libvirt daemons (qemu+tcp://, qemu+ssh://, qemu://host/):
    their NBD server listens on TCP on the URI's host (snapfs.libvirt.jobs)."""

    nbd_port: int = 10809
    nbd_ports: int = 100
    tls: bool = True
    tls_certificates: str = ""
    scratch_dir: str = ""


@dataclass(frozen=True)
class Settings:
    nbd: NbdSettings = field(default_factory=NbdSettings)
    guestfs: GuestfsSettings = field(default_factory=GuestfsSettings)
    libvirt: LibvirtSettings = field(default_factory=LibvirtSettings)


def default_config_path() -> Path:
    env = os.environ.get("SNAPFS_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "snapfs" / "config.toml"


def _apply(section: Any, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(section)}
    updates: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise SnapfsUserError(f"{where}: unknown setting {key!r}")
        default = getattr(section, key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise SnapfsUserError(f"{where}: {key} must be {type(default).__name__}, not {value!r}")
        updates[key] = value
    return replace(section, **updates)


def load_settings(path: Path | None = None, *, required: bool = False) -> Settings:
    """Settings from ``path`` (default location if None); defaults when there is no file."""
    path = path or default_config_path()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise SnapfsUserError(f"{path}: settings file not found") from None
        return Settings()
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SnapfsUserError(f"{path}: cannot read settings: {exc}") from None
    settings = Settings()
    for key, value in raw.items():
        if key not in ("nbd", "guestfs", "libvirt") or not isinstance(value, dict):
            raise SnapfsUserError(f"{path}: unknown section [{key}]")
        settings = replace(
            settings, **{key: _apply(getattr(settings, key), value, f"{path} [{key}]")}
        )
    try:
        GuestfsSettings.__post_init__(settings.guestfs)
    except ValueError as exc:
        raise SnapfsUserError(f"{path}: [guestfs] {exc}") from None
    if settings.nbd.connections < 1:
        raise SnapfsUserError(f"{path}: nbd.connections must be at least 1")
    if not 0 <= settings.nbd.read_around_kb <= 16384 or settings.nbd.read_around_kb % 4:
        raise SnapfsUserError(
            f"{path}: nbd.read_around_kb must be a multiple of 4 between 0 and 16384"
        )
    if not 0 <= settings.nbd.store_ahead_kb <= 1 << 20 or settings.nbd.store_ahead_kb % 4:
        raise SnapfsUserError(
            f"{path}: nbd.store_ahead_kb must be a multiple of 4 between 0 and 1048576"
        )
    if not 1 <= settings.nbd.store_threads <= 16:
        raise SnapfsUserError(f"{path}: nbd.store_threads must be between 1 and 16")
    lv = settings.libvirt
    if not (lv.nbd_port > 0 and lv.nbd_ports >= 1 and lv.nbd_port + lv.nbd_ports - 1 <= 65535):
        raise SnapfsUserError(f"{path}: libvirt.nbd_port/nbd_ports must name TCP ports")
    return settings
