"""NBD sources: a small TOML file listing NBD URIs, grouped into VMs and snapshots.

This is how any NBD export is mounted: Proxmox's ``nbd`` backup mechanism, a libvirt
pull-mode backup, a ``qemu-nbd``/``nbdkit`` server. The format (docs/sources.md)::

    [[vm]]
    name = "web-01"
      [[vm.snapshot]]
      name = "nightly"
      created = 2026-11-23T01:00:00Z      # optional (TOML date-time); default: file mtime
      description = "…"                   # optional
      config = ["domain.xml"]             # optional, relative to this file
        [[vm.snapshot.disk]]
        name = "vda"
        uri = "nbd+unix:///vda?socket=/run/backup/vda.sock"
        dirty_bitmap = "backup-vda"       # optional: qemu:dirty-bitmap context of changes
        tls_certificates = "/etc/pki/nbd" # optional, or tls_psk_file; nbds:// URIs
        tls_username = "backup"           # optional

Owns parsing and validation; the URIs are probed (size, allocation) by a function the
caller passes in (``snapfs.nbd.probe.probe_uris``), so the catalog does not import libnbd.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import datetime
import hashlib
import tomllib
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from snapfs.catalog.model import Catalog, Disk, Problem, Snapshot, Vm
from snapfs.errors import RepositoryError


class _Facts(Protocol):
    size: int
    allocated: int
    error: str | None


Prober = Callable[[list[tuple[str, str | None]]], list[Any]]

_TLS_KEYS = {
    "tls_certificates": "tls-certificates",
    "tls_psk_file": "tls-psk-file",
    "tls_username": "",  # goes into the URI's user part
}


def is_nbd_source(path: Path) -> bool:
    return path.is_file() and path.suffix == ".toml"


def uri_with_tls(uri: str, table: dict[str, Any], base: Path) -> str:
    """The URI with TLS settings from the table added to its query (libnbd's URI keys)."""
    extra: list[tuple[str, str]] = []
    for key, query_key in _TLS_KEYS.items():
        value = table.get(key)
        if value is None or key == "tls_username":
            continue
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
        extra.append((query_key, str((base / value).resolve())))
    username = table.get("tls_username")
    if username is not None and not isinstance(username, str):
        raise ValueError("tls_username must be a string")
    if not extra and username is None:
        return uri
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qsl(parts.query) + extra
    netloc = parts.netloc
    if username:
        # libnbd takes the TLS user name from the URI's user part.
        netloc = f"{urllib.parse.quote(username)}@{netloc.rsplit('@', 1)[-1]}"
    return urllib.parse.urlunsplit(
        parts._replace(netloc=netloc, query=urllib.parse.urlencode(query))
    )


def _str(table: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = table.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: '{key}' must be a non-empty string")
    return value


def _created(value: Any, default: float, where: str) -> float:
    if value is None:
        return default
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return float(value.timestamp())
    if isinstance(value, datetime.date):
        midnight = datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.UTC)
        return midnight.timestamp()
    raise ValueError(f"{where}: 'created' must be a TOML date-time")


def load_nbd_source(path: Path, probe: Prober) -> Catalog:
    """The catalog of the NBD source file at ``path``; problems are reported, not raised."""
    path = path.resolve()
    problems: list[Problem] = []
    # A file that is not an NBD source at all fails the mount; problems inside it do not.
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RepositoryError(f"{path}: cannot read NBD source: {exc}") from None
    default_time = path.stat().st_mtime
    vm_tables = doc.get("vm", [])
    if not isinstance(vm_tables, list) or not vm_tables:
        raise RepositoryError(f"{path}: not an NBD source (no [[vm]] tables)")

    # First pass: structure; collect the URIs to probe.
    pending: list[tuple[str, str | None]] = []
    shapes: list[tuple[str, str, str | None, list[tuple[dict[str, Any], list[Any]]]]] = []
    for i, vm_table in enumerate(vm_tables):
        where = f"{path} [[vm]] #{i + 1}"
        try:
            vm_name = _str(vm_table, "name", where)
            assert vm_name is not None
            snaps_out: list[tuple[dict[str, Any], list[Any]]] = []
            for j, snap_table in enumerate(vm_table.get("snapshot", [])):
                swhere = f"{where} snapshot #{j + 1}"
                disks_out: list[Any] = []
                for k, disk_table in enumerate(snap_table.get("disk", [])):
                    dwhere = f"{swhere} disk #{k + 1}"
                    try:
                        name = _str(disk_table, "name", dwhere)
                        uri = uri_with_tls(
                            _str(disk_table, "uri", dwhere) or "", disk_table, path.parent
                        )
                        bitmap = _str(disk_table, "dirty_bitmap", dwhere, required=False)
                        disks_out.append((name, uri, bitmap, len(pending)))
                        pending.append((uri, bitmap))
                    except ValueError as exc:
                        problems.append(Problem(dwhere, str(exc)))
                        disks_out.append((disk_table.get("name", f"disk{k}"), None, None, str(exc)))
                snaps_out.append((snap_table, disks_out))
            shapes.append((vm_name, where, None, snaps_out))
        except (ValueError, AttributeError, TypeError) as exc:
            problems.append(Problem(where, str(exc)))
            shapes.append(
                (
                    str(vm_table.get("name", f"vm{i + 1}"))
                    if isinstance(vm_table, dict)
                    else f"vm{i + 1}",
                    where,
                    str(exc),
                    [],
                )
            )

    facts = probe(pending)

    vms: list[Vm] = []
    for vm_name, where, vm_error, snaps_out in shapes:
        vm_id = hashlib.sha256(vm_name.encode()).hexdigest()[:12]
        snapshots: list[Snapshot] = []
        for j, (snap_table, disks_out) in enumerate(snaps_out):
            swhere = f"{where} snapshot #{j + 1}"
            try:
                snap_name = _str(snap_table, "name", swhere)
                assert snap_name is not None
                created = _created(snap_table.get("created"), default_time, swhere)
                description = snap_table.get("description", "")
                configs = snap_table.get("config", [])
                if isinstance(configs, str):
                    configs = [configs]
                config_files = tuple((path.parent / c).resolve() for c in configs)
                for cfg in config_files:
                    if not cfg.is_file():
                        raise ValueError(f"{swhere}: configuration file {cfg} not found")
            except ValueError as exc:
                problems.append(Problem(swhere, str(exc)))
                snapshots.append(
                    Snapshot(
                        id=f"s{j}", name=f"snapshot{j + 1}", created=default_time, error=str(exc)
                    )
                )
                continue
            disks: list[Disk] = []
            for name, uri, bitmap, ref in disks_out:
                if uri is None:
                    disks.append(Disk(str(name), Path(str(name)), "raw", error=str(ref)))
                    continue
                fact = facts[ref]
                if fact.error:
                    problems.append(Problem(f"{swhere} disk {name}", f"{uri}: {fact.error}"))
                disks.append(
                    Disk(
                        name,
                        Path(uri),
                        "raw",
                        virtual_size=fact.size,
                        allocated=fact.allocated,
                        error=fact.error,
                        uri=uri,
                        dirty_bitmap=bitmap,
                    )
                )
            snap_id = hashlib.sha256(f"{vm_name}\0{snap_name}".encode()).hexdigest()[:12]
            snapshots.append(
                Snapshot(
                    id=snap_id,
                    name=snap_name,
                    created=created,
                    description=str(description),
                    disks=tuple(disks),
                    config_files=config_files,
                )
            )
        vms.append(Vm(id=vm_id, name=vm_name, snapshots=tuple(snapshots), error=vm_error))
    return Catalog(vms=tuple(vms), problems=tuple(problems))
