"""The restore commands: ``snapfs restore create|ls|rm|export|commit|vm-config``.

This module owns their options, output (rich table, progress bars) and exit codes;
``snapfs.cli`` registers ``restore_group``. The work is done by ``snapfs.restore.store`` and
``snapfs.restore.vmconfig``. Every command takes the repository, or a snapfs mountpoint of
it (mapped back through the ``snapfs:<repository>`` fsname in ``/proc/self/mounts``).
Errors the user can fix and qemu-img failures are printed as one line, without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from snapfs.catalog import qemu_img, repo
from snapfs.cli_common import human_size as _size
from snapfs.cli_common import progress_bars as _progress_bars
from snapfs.cli_common import user_errors as _user_errors
from snapfs.errors import SnapfsUserError
from snapfs.restore import store
from snapfs.restore.model import CreateSpec, RestoreDisk
from snapfs.restore.vmconfig import Overrides, config_kind, render_vm_config


def resolve_repository(path: Path, mounts_text: str | None = None) -> Path:
    """The repository ``path`` names: itself, or the one a snapfs mountpoint serves."""
    served = store.repository_of_mount(path, mounts_text)
    if served is not None:
        if not served.is_absolute():
            raise SnapfsUserError(
                f"{path} is a snapfs mount of {served}, a relative path; name the repository"
            )
        return served
    if not repo.is_repository(path):
        raise SnapfsUserError(f"{path}: neither a snapfs repository nor a snapfs mount")
    return path


_REPO_ARG = click.argument(
    "repo_or_mount", metavar="REPO_OR_MOUNT", type=click.Path(path_type=Path, file_okay=False)
)


@click.group("restore")
def restore_group() -> None:
    """Writable restore disks kept in the repository: create, fill, export, commit."""


@restore_group.command("create")
@_REPO_ARG
@click.option("--vm", help="VM name or id of the snapshot disk to start from.")
@click.option("--snapshot", help="Snapshot name or id (default: the latest).")
@click.option("--disk", help="Disk name in the snapshot, like vda.")
@click.option("--size", help="Create an empty disk of this size instead (10G, 512M, bytes).")
@click.option("--name", default="", help="Name of the restore disk (default: VM@SNAPSHOT@DISK).")
def create_command(
    repo_or_mount: Path,
    vm: str | None,
    snapshot: str | None,
    disk: str | None,
    size: str | None,
    name: str,
) -> None:
    """Create a restore disk: copy-on-write on a snapshot disk, or empty with --size."""
    with _user_errors():
        root = resolve_repository(repo_or_mount)
        spec = CreateSpec(
            name=name,
            vm=vm,
            snapshot=snapshot,
            disk=disk,
            size=store.parse_size(size) if size is not None else None,
        )
        made = store.create_restore(root, spec)
    what = (
        f"copy-on-write on {made.source.vm_name} / {made.source.snapshot_name} / {made.source.disk}"
        if made.source
        else "empty"
    )
    click.echo(f"Created restore disk {made.name!r} ({_size(made.virtual_size)}, {what})")
    click.echo(f"  image: {made.path}")


@restore_group.command("ls")
@_REPO_ARG
def ls_command(repo_or_mount: Path) -> None:
    """List the restore disks. Exits 1 when some are broken."""
    with _user_errors():
        root = resolve_repository(repo_or_mount)
        disks, problems = store.list_restores(root)
    table = Table()
    for column in ("Name", "Created (UTC)", "Source", "Virtual", "Error"):
        table.add_column(column, overflow="fold")
    for disk in disks:
        source = (
            f"{disk.source.vm_name} / {disk.source.snapshot_name} / {disk.source.disk}"
            if disk.source
            else "(empty)"
        )
        table.add_row(
            disk.name,
            repo.format_time(disk.created)[:19].replace("T", " ") if disk.created else "",
            source,
            _size(disk.virtual_size) if disk.virtual_size else "",
            disk.error or "",
        )
    width = None if sys.stdout.isatty() else 240
    Console(width=width).print(table)
    for problem in problems:
        click.echo(f"  {problem}", err=True)
    if problems:
        click.get_current_context().exit(1)


@restore_group.command("rm")
@_REPO_ARG
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove even while the repository is mounted.")
def rm_command(repo_or_mount: Path, name: str, force: bool) -> None:
    """Delete restore disk NAME and everything written into it."""
    with _user_errors():
        root = resolve_repository(repo_or_mount)
        store.remove_restore(root, name, force=force)
    click.echo(f"Removed restore disk {name!r}")


@restore_group.command("export")
@_REPO_ARG
@click.argument("name")
@click.argument("out", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(qemu_img.FORMATS),
    default="qcow2",
    show_default=True,
    help="Format of the exported image.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--force", is_flag=True, help="Export even while the repository is mounted.")
def export_command(
    repo_or_mount: Path, name: str, out: Path, fmt: str, overwrite: bool, force: bool
) -> None:
    """Write restore disk NAME as a standalone image OUT, verified with qemu-img compare."""
    with _user_errors():
        root = resolve_repository(repo_or_mount)
        if not force:
            # A mount may hold the image open for writing, with data not yet flushed.
            store.ensure_not_mounted(root, f"export restore disk {name!r}")
        with _progress_bars() as progress:
            store.export_restore(root, name, out, fmt, progress, overwrite=overwrite)
    click.echo(f"Exported {name!r} to {out} ({fmt}); verified: it reads the same")


@restore_group.command("commit")
@_REPO_ARG
@click.argument("name")
@click.option("--vm", "vm", required=True, help="VM to add the snapshot to (name or id).")
@click.option("--disk", "disk_name", help="Disk name in the snapshot (default: the source's).")
@click.option("--description", default="", help="Free text stored with the snapshot.")
@click.option("--force", is_flag=True, help="Commit even while the repository is mounted.")
def commit_command(
    repo_or_mount: Path,
    name: str,
    vm: str,
    disk_name: str | None,
    description: str,
    force: bool,
) -> None:
    """Add restore disk NAME to the repository as a new snapshot of --vm.

    When the VM has snapshots only the clusters that differ from the parent are stored.
    """
    with _user_errors():
        root = resolve_repository(repo_or_mount)
        if not force:
            store.ensure_not_mounted(root, f"commit restore disk {name!r}")
        with _progress_bars() as progress:
            added = store.commit_restore(
                root, name, vm, description=description, disk_name=disk_name, progress=progress
            )
    kind = f"incremental on {added.parent}" if added.parent else "full"
    click.echo(f"Added snapshot {added.name!r} ({added.snapshot_id}, {kind}) of VM {vm!r}")


def _parse_disk_map(values: tuple[str, ...]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for value in values:
        key, sep, name = value.partition("=")
        if not sep or not key or not name:
            raise click.BadParameter(f"expected DISK=RESTORE_NAME (like vda=r1), got {value!r}")
        mapping[key] = name
    return mapping


def _captured_config(root: Path, disk: RestoreDisk, given: Path | None) -> tuple[Path, list[str]]:
    if given is not None:
        return given, []
    source = store.source_snapshot_disk(root, disk)
    if source is None:
        raise SnapfsUserError(
            f"restore disk {disk.name!r} is empty (no snapshot): give the configuration "
            "with --config"
        )
    names = _snapshot_disk_names(source.snapshot_dir)
    for path in source.config_files:
        if config_kind(path) is not None:
            return path, names
    raise SnapfsUserError(
        f"snapshot {source.snapshot_name!r} of VM {source.vm_name!r} has no libvirt or OVF "
        "configuration; give one with --config"
    )


def _snapshot_disk_names(snapshot_dir: Path) -> list[str]:
    try:
        data = json.loads((snapshot_dir / repo.SNAPSHOT_FILE).read_text(encoding="utf-8"))
        return [str(d["name"]) for d in data.get("disks", []) if isinstance(d, dict)]
    except (OSError, ValueError, KeyError):
        return []


@restore_group.command("vm-config")
@_REPO_ARG
@click.argument("name")
@click.option("--name", "new_name", help="Name of the new VM (default: the old one + -restored).")
@click.option("--memory", type=int, help="Memory in MiB.")
@click.option("--cpus", type=int, help="Number of virtual CPUs.")
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar="DISK=RESTORE_NAME",
    help="Attach restore disk RESTORE_NAME as DISK (vda, or an OVF disk id/alias).",
)
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Configuration to start from (default: the one captured with NAME's snapshot).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write to this file (or into this directory); default: standard output.",
)
def vm_config_command(
    repo_or_mount: Path,
    name: str,
    new_name: str | None,
    memory: int | None,
    cpus: int | None,
    disks: tuple[str, ...],
    config: Path | None,
    out: Path | None,
) -> None:
    """Write the configuration of a new VM on restore disk NAME (libvirt XML or OVF).

    Starts from the configuration captured with NAME's snapshot: new name and ids, disks
    pointing at the restore disks, MAC addresses and snapshot history dropped. Disks with
    no restore disk given are removed.
    """
    mapping = _parse_disk_map(disks)
    with _user_errors():
        root = resolve_repository(repo_or_mount)
        main = store.get_restore(root, name)
        if main.error is not None:
            raise SnapfsUserError(f"restore disk {name!r} is broken: {main.error}")
        if (
            main.source is not None
            and main.source.disk not in mapping
            and name not in (mapping.values())
        ):
            mapping[main.source.disk] = name
        if not mapping:
            raise SnapfsUserError(
                f"restore disk {name!r} has no source disk: say which disk it is with --disk"
            )
        restores = {key: store.get_restore(root, value) for key, value in mapping.items()}
        captured, snapshot_disks = _captured_config(root, main, config)
        rendered = render_vm_config(
            restores,
            captured,
            Overrides(name=new_name, memory_mib=memory, cpus=cpus),
            snapshot_disks=snapshot_disks,
        )
        if out is None:
            click.echo(rendered.data, nl=False)
        else:
            target = out / rendered.filename if out.is_dir() else out
            target.write_bytes(rendered.data)
            click.echo(f"Wrote {rendered.kind} configuration to {target}", err=True)
    for note in dict.fromkeys(rendered.notes):
        click.echo(f"note: {note}", err=True)
