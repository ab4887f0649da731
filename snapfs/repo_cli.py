"""The repository commands: ``snapfs repo init|add-snapshot|sample`` and ``snapfs ls``.

This module owns their options, output (rich tables and progress bars, ``--json``) and exit
codes; ``snapfs.cli`` registers ``repo_group`` and ``ls_command``. Errors the user can fix
(``SnapfsUserError``) and failures of qemu-img or of the repository (``SnapfsError``) become
one-line ``click.ClickException`` messages, without a traceback.

``snapfs ls`` exits 0 for a clean repository and 1 when it has problems (after printing the
good entries and the list of problems).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from snapfs.catalog import qemu_img, repo, writer
from snapfs.catalog.model import Catalog, Disk, Snapshot, Vm
from snapfs.cli_common import human_size as _size
from snapfs.cli_common import progress_bars as _progress_bars
from snapfs.cli_common import user_errors as _user_errors

# --- repo ---------------------------------------------------------------------------------


@click.group("repo")
def repo_group() -> None:
    """Create and fill a snapfs repository (a directory of VM backups)."""


@repo_group.command("init")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def init_command(directory: Path) -> None:
    """Create an empty repository in DIRECTORY (new or empty)."""
    with _user_errors():
        writer.init_repository(directory)
    click.echo(f"Initialised empty snapfs repository in {directory}")


def _parse_disk(value: str) -> tuple[str, Path]:
    name, sep, image = value.partition("=")
    if not sep or not name or not image:
        raise click.BadParameter(f"expected NAME=IMAGE (like vda=disk.qcow2), got {value!r}")
    return name, Path(image)


@repo_group.command("add-snapshot")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--vm", "vm_name", required=True, help="VM name (created on its first snapshot).")
@click.option(
    "--disk",
    "disks",
    multiple=True,
    required=True,
    metavar="NAME=IMAGE",
    help="A disk of the snapshot, like vda=/path/disk.qcow2 (repeatable).",
)
@click.option(
    "--config",
    "configs",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="VM configuration captured with the snapshot (OVF, libvirt XML; kept verbatim).",
)
@click.option(
    "--incremental",
    is_flag=True,
    help="Store only the blocks that differ from the parent snapshot (qcow2 overlays).",
)
@click.option("--parent", help="Parent snapshot id for --incremental (default: the newest).")
@click.option("--description", default="", help="Free text stored with the snapshot.")
@click.option("--name", help="Snapshot name (default: its UTC creation time).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(qemu_img.FORMATS),
    default="qcow2",
    show_default=True,
    help="Image format of a full snapshot's disks.",
)
@click.option(
    "--source-format",
    type=click.Choice(qemu_img.FORMATS),
    help="Format of the given images (default: detected by qemu-img).",
)
def add_snapshot_command(
    directory: Path,
    vm_name: str,
    disks: tuple[str, ...],
    configs: tuple[Path, ...],
    incremental: bool,
    parent: str | None,
    description: str,
    name: str | None,
    fmt: str,
    source_format: str | None,
) -> None:
    """Add a snapshot of VM --vm to the repository in DIRECTORY."""
    sources = []
    for value in disks:
        disk_name, image = _parse_disk(value)
        sources.append(writer.DiskSource(disk_name, image, source_format))
    with _user_errors():
        repo.read_marker(directory)
        with _progress_bars() as progress:
            added = writer.add_snapshot(
                directory,
                vm_name,
                sources,
                config_files=configs,
                incremental=incremental,
                parent=parent,
                description=description,
                name=name,
                format=fmt,
                progress=progress,
            )
    kind = f"incremental on {added.parent}" if added.parent else "full"
    click.echo(f"Added snapshot {added.name!r} ({added.snapshot_id}, {kind}) of VM {vm_name!r}")


@repo_group.command("sample")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def sample_command(directory: Path) -> None:
    """Build a small sample repository in DIRECTORY (two VMs, three snapshots each)."""
    from snapfs.sample import build_sample_repository

    with _user_errors():
        build_sample_repository(directory)
    click.echo(f"Built a sample repository in {directory}")


# --- ls -----------------------------------------------------------------------------------


def _disk_json(disk: Disk) -> dict[str, Any]:
    return {
        "name": disk.name,
        "path": str(disk.path),
        "format": disk.format,
        "virtual_size": disk.virtual_size,
        "allocated": disk.allocated,
        "file_size": disk.file_size,
        "backing": str(disk.backing) if disk.backing else None,
        "error": disk.error,
    }


def _snapshot_json(snap: Snapshot) -> dict[str, Any]:
    return {
        "id": snap.id,
        "name": snap.name,
        "created": repo.format_time(snap.created),
        "description": snap.description,
        "parent": snap.parent,
        "path": str(snap.path) if snap.path else None,
        "config_files": [str(p) for p in snap.config_files],
        "disks": [_disk_json(d) for d in snap.disks],
        "error": snap.error,
    }


def _vm_json(vm: Vm) -> dict[str, Any]:
    return {
        "id": vm.id,
        "name": vm.name,
        "path": str(vm.path) if vm.path else None,
        "snapshots": [_snapshot_json(s) for s in vm.snapshots],
        "error": vm.error,
    }


def catalog_json(catalog: Catalog) -> dict[str, Any]:
    """The JSON form of a catalog (``snapfs ls --json``)."""
    return {
        "vms": [_vm_json(vm) for vm in catalog.vms],
        "problems": [{"where": p.where, "message": p.message} for p in catalog.problems],
    }


def _backing_label(disk: Disk, snap_names: dict[Path, str]) -> str:
    if disk.backing is None:
        return ""
    # A backing file in another snapshot's disks/ directory is shown as that snapshot.
    owner = snap_names.get(disk.backing.parent.parent)
    return owner if owner is not None else str(disk.backing)


def catalog_table(catalog: Catalog) -> Table:
    """The rich table of ``snapfs ls``: one row per disk (or per broken VM or snapshot)."""
    table = Table(show_lines=False)
    for column in ("VM", "Snapshot", "Created (UTC)", "Disk", "Format"):
        table.add_column(column, overflow="fold")
    for column in ("Virtual", "Allocated", "File"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("Backing", overflow="fold")
    table.add_column("Error", style="red", overflow="fold")
    snap_names = {s.path: s.name for vm in catalog.vms for s in vm.snapshots if s.path}
    for vm in catalog.vms:
        if vm.error or not vm.snapshots:
            table.add_row(vm.name, "", "", "", "", "", "", "", "", vm.error or "no snapshots")
        for snap in vm.snapshots:
            created = repo.format_time(snap.created)[:19].replace("T", " ")
            if snap.error or not snap.disks:
                table.add_row(
                    vm.name, snap.name, created, "", "", "", "", "", "", snap.error or "no disks"
                )
            for disk in snap.disks:
                table.add_row(
                    vm.name,
                    snap.name,
                    created,
                    disk.name,
                    disk.format,
                    _size(disk.virtual_size) if not disk.error else "",
                    _size(disk.allocated) if not disk.error else "",
                    _size(disk.file_size) if not disk.error else "",
                    _backing_label(disk, snap_names),
                    disk.error or "",
                )
    return table


@click.command("ls")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def ls_command(directory: Path, as_json: bool) -> None:
    """List the VMs, snapshots and disks of the repository in DIRECTORY.

    Exits with status 1 when the repository has problems (after listing what is readable).
    """
    with _user_errors():
        catalog = repo.load_repository(directory)
    if as_json:
        click.echo(json.dumps(catalog_json(catalog), indent=2, ensure_ascii=False))
    else:
        # Piped output is read by people through less or by grep: do not fold it to 80 columns.
        width = None if sys.stdout.isatty() else 240
        Console(width=width).print(catalog_table(catalog))
        if catalog.problems:
            # Plain lines, never folded: users grep and copy these paths.
            click.secho(f"{len(catalog.problems)} problem(s):", err=True, fg="red", bold=True)
            for problem in catalog.problems:
                click.echo(f"  {problem}", err=True)
    if catalog.problems:
        click.get_current_context().exit(1)
