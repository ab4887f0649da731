"""``snapfs backup URI REPO``: back up running libvirt domains into a repository.

Owns the command's options, its output (one rich progress bar per disk, sized in bytes to
copy, known from the extents before copying starts; messages such as a fallback to a full
backup on stderr) and its exit code: 0 when every domain was backed up, 1 otherwise (each
domain is tried; a failure does not stop the others). Ctrl-C interrupts the running backup,
which cleans up after itself (``snapfs.libvirt.backup``), and exits 130 (click: "Aborted!").
For a remote daemon the NBD transport options (port, TLS, scratch directory) default to the
settings file's ``[libvirt]`` table (``snapfs.config``).
``snapfs.cli`` registers ``backup_command``. Blocking, on the main thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from snapfs.config import load_settings
from snapfs.errors import SnapfsError, SnapfsUserError
from snapfs.libvirt import backup, jobs


@contextmanager
def _progress_bars(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    """One bar per disk; bars appear on the first report (after the extents are known)."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=console,
    )
    tasks: dict[str, TaskID] = {}

    def update(disk: str, done: int, total: int) -> None:
        if not tasks:
            progress.start()
        if disk not in tasks:
            tasks[disk] = progress.add_task(disk, total=max(total, 1))
        progress.update(tasks[disk], completed=done if total else 1)

    try:
        yield update
    finally:
        if tasks:
            progress.stop()


def _parse_skips(values: tuple[str, ...]) -> tuple[frozenset[str], dict[str, set[str]]]:
    """``--skip-disk vdb`` (every domain) or ``--skip-disk web-01:vdb`` (one domain)."""
    everywhere: set[str] = set()
    per_vm: dict[str, set[str]] = {}
    for value in values:
        vm, sep, disk = value.rpartition(":")
        if not disk:
            raise click.BadParameter(f"expected DISK or VM:DISK, got {value!r}")
        if sep:
            per_vm.setdefault(vm, set()).add(disk)
        else:
            everywhere.add(disk)
    return frozenset(everywhere), per_vm


@click.command("backup")
@click.argument("uri")
@click.argument("repository", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--vm",
    "vm_names",
    multiple=True,
    metavar="NAME",
    help="Domain to back up (repeatable; default: every running domain).",
)
@click.option(
    "--full", "mode", flag_value="full", help="Copy every allocated block, not only changes."
)
@click.option(
    "--incremental",
    "mode",
    flag_value="incremental",
    help="Require an earlier backup to be incremental on (a broken chain still falls back "
    "to full, with a message).",
)
@click.option(
    "--skip-disk",
    "skips",
    multiple=True,
    metavar="[VM:]DISK",
    help="Leave a disk out of the backup (backup='no'), e.g. vdb or web-01:vdb (repeatable).",
)
@click.option(
    "--nbd-port",
    type=click.IntRange(1, 65535),
    help="Remote URIs: the TCP port the job's NBD server listens on (default: the first "
    "free one from [libvirt] nbd_port, 10809).",
)
@click.option(
    "--tls/--no-tls",
    "tls",
    default=None,
    help="Remote URIs: serve the disks over TLS (nbds://; default [libvirt] tls = true).",
)
@click.option(
    "--tls-certificates",
    metavar="DIR",
    help="Remote URIs: client TLS directory (ca-cert.pem, client-cert.pem, client-key.pem).",
)
@click.option(
    "--scratch-dir",
    metavar="DIR",
    help="Remote URIs: directory on the libvirt host for the job's scratch files "
    "(default: beside each disk image).",
)
def backup_command(
    uri: str,
    repository: Path,
    vm_names: tuple[str, ...],
    mode: str | None,
    skips: tuple[str, ...],
    nbd_port: int | None,
    tls: bool | None,
    tls_certificates: str | None,
    scratch_dir: str | None,
) -> None:
    """Back up libvirt domains at URI (qemu:///system, qemu+unix:///system?socket=...,
    qemu+tcp://host/system, qemu+ssh://host/system) into REPOSITORY.

    Each domain's first backup is full; later ones copy only the blocks changed since the
    checkpoint of the previous backup (libvirt pull-mode backups with checkpoints). The
    domain XML at backup time is stored with each snapshot. A remote daemon's job serves
    the disks over TCP on the URI's host, with TLS unless --no-tls.
    """
    if not jobs.is_libvirt_uri(uri):
        raise click.BadParameter(f"{uri!r} is not a libvirt URI (like qemu:///system)")
    # Messages are not wrapped: they name paths that a wrap would break.
    console = Console(stderr=True, soft_wrap=True)
    skip_all, skip_per_vm = _parse_skips(skips)
    failures = 0
    try:
        endpoint = jobs.remote_endpoint(
            uri,
            load_settings().libvirt,
            port=nbd_port,
            tls=tls,
            certificates=tls_certificates,
            scratch_dir=scratch_dir,
        )
        with backup.connection(uri) as conn:
            domains = _domains(conn, vm_names, console)
            if not domains:
                raise SnapfsUserError(f"no running domain at {uri}")
            for dom in domains:
                name = dom.name()
                skip = skip_all | frozenset(skip_per_vm.get(name, ()))
                console.print(f"[bold]{name}[/bold]")
                try:
                    with _progress_bars(console) as bars:
                        result = backup.backup_domain(
                            dom,
                            repository,
                            mode=mode or "auto",
                            skip=skip,
                            progress=bars,
                            notice=lambda m: console.print(f"  {m}", highlight=False),
                            endpoint=endpoint,
                        )
                except (SnapfsError, SnapfsUserError) as exc:
                    failures += 1
                    message = exc.message if isinstance(exc, SnapfsError) else str(exc)
                    console.print(f"  [red]failed:[/red] {message}", highlight=False)
                    continue
                kind = f"incremental on {result.parent}" if result.parent else "full"
                copied = sum(d.to_copy for d in result.disks)
                console.print(
                    f"  snapshot {result.name} ({result.snapshot_id}), {kind}, "
                    f"{copied} bytes copied",
                    highlight=False,
                )
    except SnapfsUserError as exc:
        raise click.ClickException(str(exc)) from None
    except SnapfsError as exc:
        raise click.ClickException(exc.message) from None
    if failures:
        raise click.exceptions.Exit(1)


def _domains(conn: Any, names: tuple[str, ...], console: Console) -> list[Any]:
    if names:
        found = []
        for name in names:
            try:
                found.append(conn.lookupByName(name))
            except Exception:
                raise SnapfsUserError(f"no domain named {name!r}") from None
        return found
    running = []
    for dom in conn.listAllDomains():
        if dom.isActive():
            running.append(dom)
        else:
            console.print(f"{dom.name()}: not running, skipped", highlight=False)
    return sorted(running, key=lambda d: str(d.name()))
