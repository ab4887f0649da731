"""The ``snapfs`` command line (click): mount, umount, ls and the repo commands.

``snapfs mount`` runs in the background by default: the command starts a detached daemon
(``snapfs mount --foreground`` in a new session, logging to a file) and returns once the
daemon says the mount is up, or prints why it is not. The daemon reports through a pipe
whose fd is passed in ``SNAPFS_READY_FD``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import click
import trio

from snapfs.config import Settings, load_settings
from snapfs.errors import SnapfsError, SnapfsUserError
from snapfs.libvirt.jobs import is_libvirt_uri
from snapfs.libvirt_cli import backup_command
from snapfs.log import setup_logging
from snapfs.mountpoint import (
    FSTYPE,
    check_mountpoint,
    daemon_pid,
    fstype_at,
    fusermount_unmount,
    is_stale,
)
from snapfs.repo_cli import ls_command, repo_group
from snapfs.restore_cli import restore_group
from snapfs.sources import check_source

log = logging.getLogger(__name__)

# How long ``snapfs mount`` waits for the daemon to report; loading a big repository
# (qemu-img info of every image) can take a while on a busy machine.
MOUNT_READY_TIMEOUT_S = 300
# How long ``snapfs umount`` waits for the daemon to stop its servers and exit.
UMOUNT_WAIT_S = 60


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """One-line messages and an exit code for errors the user can act on."""
    try:
        yield
    except SnapfsUserError as exc:
        click.echo(f"snapfs: {exc}", err=True)
        sys.exit(exc.exit_code)
    except SnapfsError as exc:
        click.echo(f"snapfs: {exc.message}", err=True)
        sys.exit(1)


@click.group()
@click.version_option()
def cli() -> None:
    """snapfs: browse and restore virtual-machine backups as a filesystem."""


cli.add_command(repo_group)
cli.add_command(ls_command)
cli.add_command(restore_group)
cli.add_command(backup_command)


def default_log_path(mountpoint: Path) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:8]
    return Path(base) / "snapfs" / f"mount-{mountpoint.name or 'root'}-{digest}.log"


@cli.command()
@click.argument("source")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--foreground", "-f", is_flag=True, help="Stay attached; log to stderr.")
@click.option("--force", is_flag=True, help="Clear a dead (stale) mount at MOUNTPOINT first.")
@click.option("--allow-other", is_flag=True, help="Let other users see the mount.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Settings file.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), help="Log file.")
@click.option(
    "--no-page-cache",
    is_flag=True,
    help="Read disk images without the kernel's page cache: faster whole-disk copies, no "
    "repeated reads from cache ([nbd] page_cache = false).",
)
@click.option("--debug", is_flag=True, help="Debug logging.")
@click.option("--debug-fuse", is_flag=True, hidden=True)
def mount(
    source: str,
    mountpoint: Path,
    foreground: bool,
    force: bool,
    allow_other: bool,
    config_path: Path | None,
    log_path: Path | None,
    no_page_cache: bool,
    debug: bool,
    debug_fuse: bool,
) -> None:
    """Mount the backup SOURCE (a repository directory) at MOUNTPOINT."""
    ready_fd = os.environ.pop("SNAPFS_READY_FD", None)
    with user_errors():
        mountpoint = check_mountpoint(mountpoint, force=force)
        settings = load_settings(config_path, required=config_path is not None)
        if no_page_cache:
            settings = replace(settings, nbd=replace(settings.nbd, page_cache=False))
        check_source(source)
        if not is_libvirt_uri(source):
            source = os.path.abspath(source)
    def run_daemon(ready: int | None, logfile: Path | None) -> None:
        _serve(source, mountpoint, settings, allow_other, debug, debug_fuse, logfile, ready)

    if not foreground:
        _mount_in_background(mountpoint, log_path or default_log_path(mountpoint), run_daemon)
        return
    run_daemon(int(ready_fd) if ready_fd is not None else None, log_path)


def _serve(
    source: str,
    mountpoint: Path,
    settings: Settings,
    allow_other: bool,
    debug: bool,
    debug_fuse: bool,
    log_path: Path | None,
    ready_fd: int | None,
) -> None:
    """Run the mount in this process until it is unmounted; ``ready_fd`` hears "ok"/"error"."""
    setup_logging(debug=debug, logfile=log_path)

    def on_ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    from snapfs.mount import serve  # pyfuse3 is only needed by the daemon

    try:
        trio.run(
            lambda: serve(
                source,
                mountpoint,
                settings,
                allow_other=allow_other,
                debug_fuse=debug_fuse,
                on_ready=on_ready,
            )
        )
    except (SnapfsError, SnapfsUserError, RuntimeError, OSError) as exc:
        message = exc.message if isinstance(exc, SnapfsError) else str(exc)
        log.error("mount failed: %s", message)
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"error: {message}\n".encode())
        click.echo(f"snapfs: mount failed: {message}", err=True)
        sys.exit(1)


def _mount_in_background(
    mountpoint: Path, log_path: Path, run_daemon: Callable[[int | None, Path | None], None]
) -> None:
    """Fork the daemon, detached, and wait until it reports the mount up (or failed).

    A fork, not a new interpreter: the daemon starts with everything imported and the
    settings checked (a new ``python -m snapfs`` cost ~0.5 s before the mount was up).
    Nothing has started threads or a trio loop yet, so forking is safe here.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            run_daemon(write_end, log_path)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + MOUNT_READY_TIMEOUT_S
    message = b""
    with os.fdopen(read_end, "rb") as pipe:
        while time.monotonic() < deadline:
            chunk = pipe.readline()
            message += chunk
            if not chunk or chunk.endswith(b"\n"):
                break
    text = message.decode(errors="replace").strip()
    if text == "ok":
        click.echo(f"mounted at {mountpoint} (pid {pid}, log {log_path})")
        # Done: skip the interpreter's teardown of every imported module (libguestfs, nbd,
        # trio, rich: ~0.1 s on the way to a first ls).
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)
    _reap_failed_daemon(pid, still_silent=not text)
    reason = text.removeprefix("error: ") if text else f"daemon exited; see {log_path}"
    click.echo(f"snapfs: mount failed: {reason}", err=True)
    sys.exit(1)


def _reap_failed_daemon(pid: int, *, still_silent: bool) -> None:
    """Collect a daemon whose mount failed (stopping it first if it never answered)."""
    signals = [signal.SIGTERM, signal.SIGKILL] if still_silent else [signal.SIGKILL]
    deadline = time.monotonic() + 10
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if still_silent or time.monotonic() > deadline:
            if not signals:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signals.pop(0))
            still_silent = False
            deadline = time.monotonic() + 10
        time.sleep(0.05)


@cli.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if files are open.")
def umount(mountpoint: Path, lazy: bool) -> None:
    """Unmount a snapfs mount and wait until its servers are stopped."""
    mountpoint = Path(os.path.abspath(mountpoint))
    with user_errors():
        kind = fstype_at(mountpoint)
        if kind is None:
            raise SnapfsUserError(f"{mountpoint} is not mounted")
        if kind != FSTYPE:
            raise SnapfsUserError(f"{mountpoint} is not a snapfs mount ({kind})")
        pid = daemon_pid(mountpoint)
        fusermount_unmount(mountpoint, lazy=lazy or is_stale(mountpoint))
        if pid is None:
            return
        deadline = time.monotonic() + UMOUNT_WAIT_S
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            with contextlib.suppress(OSError):
                # A zombie has finished: its stat shows state Z.
                if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                    return
            time.sleep(0.05)
        raise SnapfsUserError(f"unmounted, but daemon pid {pid} is still running", 2)


def main() -> None:
    cli()
