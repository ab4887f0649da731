"""The mount's lifecycle: load the source, start FUSE, serve, and stop everything it started.

Owns the order of start and stop (s3ql's mount.py model): the catalog is loaded in a worker
thread before FUSE is initialised; exports and appliances run in one nursery; SIGINT,
SIGTERM, ``snapfs umount`` and ``fusermount3 -u`` all end ``pyfuse3.main``; then, shielded
from cancellation, every export is flushed and stopped, FUSE is closed and the runtime
directory removed. Once the kernel has ended the FUSE connection, requests still being
handled get ``STUCK_HANDLER_GRACE_S`` and are then cancelled (a handler stuck on an appliance
or a server must not keep the daemon alive; the shielded stop still flushes everything). A
daemon killed with SIGKILL cannot clean up, but its qemu-nbd servers die with it
(parent-death signal, see ``nbd.server``) and the next mount of the same mountpoint removes
the leftover runtime directory.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from snapfs.catalog.model import Catalog
from snapfs.config import Settings
from snapfs.fuse_ops import REQUEST_COUNTS, Operations
from snapfs.guest_vfs import GuestFiles
from snapfs.guestfs import AppliancePool
from snapfs.libvirt.jobs import is_libvirt_uri
from snapfs.libvirt.source import LiveJobs
from snapfs.mountpoint import (
    create_runtime_dir,
    mount_device,
    remove_runtime_dir,
    set_read_ahead,
)
from snapfs.nbd.export import ExportManager
from snapfs.readaround import ReadAround
from snapfs.restore_guest_vfs import RestoreGuests
from snapfs.restore_tree import RestoreRoot
from snapfs.sources import load_source, repository_of
from snapfs.vfs import Dir, Tree, build_tree

log = logging.getLogger(__name__)


async def _terminate_on_signals(read_around: ReadAround) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            # Page-cache stores end only while the main loop answers reads (readaround.py).
            await read_around.aclose()
            pyfuse3.terminate()


# The kernel's FUSE control filesystem: one directory per live connection, named by the
# mount's device minor number, gone once the kernel has ended the connection.
FUSECTL = Path("/sys/fs/fuse/connections")


def abort_connection(mountpoint: Path) -> bool:
    """End the kernel's FUSE connection of ``mountpoint`` (its fusectl ``abort``): every
    request waiting for this daemon fails with ENOTCONN. True if written."""
    device = mount_device(mountpoint)
    if device is None:
        return False  # unmounted: the connection has ended already
    connection = FUSECTL / device.split(":")[1]
    try:
        (connection / "abort").write_text("1\n")
    except OSError as exc:
        log.error("cannot abort the FUSE connection %s: %s", connection, exc)
        return False
    return True


# After the kernel ended the connection (an unmount), requests still being handled get this
# long to finish; then they are cancelled, so that a handler stuck on an appliance or a
# server cannot keep the daemon, and everything it started, alive.
STUCK_HANDLER_GRACE_S = 10.0


async def end_when_disconnected(
    connection: Path,
    serving: trio.Event,
    *,
    poll_s: float = 1.0,
    grace_s: float = STUCK_HANDLER_GRACE_S,
    terminate: Callable[[], None] = pyfuse3.terminate,
) -> None:
    """Call ``terminate`` ``grace_s`` after ``connection`` (its fusectl directory) is gone,
    unless ``serving`` was set meanwhile (the main loop returned by itself)."""
    if not await trio.to_thread.run_sync(connection.is_dir):
        log.debug("no %s: the connection is not watched", connection)
        return
    while not serving.is_set() and await trio.to_thread.run_sync(connection.is_dir):
        await trio.sleep(poll_s)
    with trio.move_on_after(grace_s):
        await serving.wait()
        return
    log.warning(
        "the FUSE connection ended %.0f s ago and requests are still being handled: "
        "cancelling them",
        grace_s,
    )
    terminate()


async def _after_init(
    mountpoint: Path,
    settings: Settings,
    source: str,
    on_ready: Callable[[], None] | None,
    main_returned: trio.Event,
    read_around: ReadAround,
) -> None:
    """Tune the mount once the kernel has finished FUSE INIT, report it ready, then watch
    the connection (``end_when_disconnected``)."""
    # A stat of the root is answered only after INIT; a read-ahead written before that is
    # overwritten by the kernel with what libfuse negotiated (128 KiB).
    st = await trio.to_thread.run_sync(os.stat, mountpoint)
    if settings.nbd.read_ahead_kb > 0:
        applied = await trio.to_thread.run_sync(
            set_read_ahead, mountpoint, settings.nbd.read_ahead_kb
        )
        log.info("kernel read-ahead for this mount: %s KiB", applied)
        if applied:
            read_around.set_stripe(applied << 10)
    log.info("mounted %s at %s (pid %d)", source, mountpoint, os.getpid())
    if on_ready is not None:
        on_ready()
    await end_when_disconnected(FUSECTL / str(os.minor(st.st_dev)), main_returned)


def fuse_options(source: str, *, allow_other: bool, debug: bool) -> set[str]:
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {f"fsname=snapfs:{source}", "subtype=snapfs", "default_permissions"}
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    return options


async def serve(
    source: str,
    mountpoint: Path,
    settings: Settings,
    *,
    allow_other: bool = False,
    debug_fuse: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount ``source`` at ``mountpoint`` and serve until unmounted or signalled."""
    started = time.monotonic()
    catalog: Catalog = await trio.to_thread.run_sync(load_source, source)
    for problem in catalog.problems:
        log.warning("source problem: %s", problem)
    log.info(
        "loaded %s: %d VMs, %d snapshots in %.2f s",
        source,
        len(catalog.vms),
        sum(len(vm.snapshots) for vm in catalog.vms),
        time.monotonic() - started,
    )
    runtime_dir = create_runtime_dir(mountpoint)
    try:
        live = (
            LiveJobs(source, idle_timeout=settings.nbd.idle_timeout)
            if is_libvirt_uri(source)
            else None
        )
        async with trio.open_nursery() as nursery:
            exports = ExportManager(runtime_dir, nursery, settings.nbd)
            if live is not None:
                exports.prepare_uri = live.prepare
                nursery.start_soon(live.reap_idle, exports)
            repo = repository_of(source)

            pool = AppliancePool(settings.guestfs)
            nursery.start_soon(pool.run)
            guest_files = GuestFiles(pool, settings.guestfs)
            restore_guests = RestoreGuests(pool, settings.guestfs)

            def add_restore_area(tree: Tree, root: Dir) -> None:
                if repo is not None:
                    root.add(RestoreRoot(tree, root, repo, guests=restore_guests))

            tree, _root = build_tree(
                catalog,
                exports,
                snapshot_hook=guest_files.add_to_snapshot,
                root_hook=add_restore_area,
            )
            read_around = ReadAround(
                settings.nbd.read_around_kb << 10,
                ahead=settings.nbd.store_ahead_kb << 10,
                # The kernel's read-ahead window; 128 KiB is what libfuse negotiates.
                stripe=(settings.nbd.read_ahead_kb or 128) << 10,
                threads=settings.nbd.store_threads,
                data_ahead=settings.nbd.store_data,
            )
            operations = Operations(
                tree, read_around, disk_page_cache=settings.nbd.page_cache
            )
            pyfuse3.init(
                operations,
                str(mountpoint),
                fuse_options(source, allow_other=allow_other, debug=debug_fuse),
            )
            if settings.nbd.store_process and settings.nbd.page_cache:
                # Here, on the main thread: the process's death signal follows this thread.
                read_around.start_store_process()
            main_returned = trio.Event()
            try:
                nursery.start_soon(_terminate_on_signals, read_around)
                nursery.start_soon(exports.reap_idle)
                nursery.start_soon(
                    _after_init, mountpoint, settings, source, on_ready, main_returned,
                    read_around,
                )
                await pyfuse3.main()
            finally:
                main_returned.set()
                with trio.CancelScope(shield=True):
                    # No page-cache store may be inside libfuse when the session goes.
                    await read_around.aclose(functools.partial(abort_connection, mountpoint))
                    # Unmount first so that no request waits on a stopping server.
                    pyfuse3.close(unmount=True)
                    # Appliances first: they are clients of the exports.
                    await restore_guests.aclose()  # sync + umount into the NBD servers
                    await guest_files.aclose()
                    await pool.aclose()
                    await exports.stop_all()
                    if live is not None:
                        await live.aclose()
                nursery.cancel_scope.cancel()
                log.info("%s", read_around.summary())
                log.info(
                    "FUSE requests served: %s",
                    ", ".join(f"{op} {n}" for op, n in REQUEST_COUNTS.most_common()) or "none",
                )
    finally:
        remove_runtime_dir(runtime_dir)
        log.info("unmounted %s", mountpoint)
