"""libvirt connections, domain disks and pull-mode backup jobs.

Owns everything that talks to libvirt: opening a connection (``open_connection``), reading a
domain's disks from its XML (``domain_disks``), the backup and checkpoint XML, and
``PullJob``: one ``virDomainBackupBegin`` in pull mode with its private directory (the NBD
unix socket and the scratch files), ended by ``PullJob.end`` (``abortJob``, which also makes
libvirt delete the socket and the scratch files; the directory is removed here).

A private directory holds an ``owner`` file with the pid of the process that began the job:
a job left behind by a process that died (Ctrl-C during a libvirt outage, ``kill -9``) is
recognised as ours and stale by ``end_stale_job``, so the next run can end it and proceed.

Thread rules: everything here blocks (libvirt RPCs). Callers on the trio loop use
``trio.to_thread.run_sync``. A libvirt connection may be shared between threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import libvirt

from snapfs.errors import SnapfsError, SnapfsUserError

log = logging.getLogger(__name__)

# Private job directories are named like this; ``end_stale_job`` only touches jobs whose
# socket lives in such a directory (never another tool's backup job).
JOB_DIR_PREFIX = "snapfs-job-"
OWNER_FILE = "owner"
SOCKET_NAME = "nbd.sock"
# backupBegin returns once QEMU's NBD server listens, but give a loaded machine time before
# declaring the socket missing.
SOCKET_WAIT_S = 60.0
# Ending a job takes QEMU well under a second; allow for a loaded machine.
JOB_END_WAIT_S = 60.0
# Checkpoints snapfs creates are named with this prefix (plus the snapshot id).
CHECKPOINT_PREFIX = "snapfs-"


class LibvirtError(SnapfsError):
    """A libvirt call failed; the message says which and why."""


def is_libvirt_uri(source: str) -> bool:
    """Whether SOURCE is a libvirt connection URI (``qemu:///system``, ``qemu+ssh://…``)."""
    scheme = source.split(":", 1)[0] if "://" in source else ""
    driver = scheme.split("+", 1)[0]
    return driver in ("qemu", "test")


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; ours are raised and reported."""


def open_connection(uri: str) -> Any:
    """A read-write libvirt connection (raises ``SnapfsUserError`` with libvirt's reason)."""
    libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise SnapfsUserError(f"cannot connect to {uri}: {exc.get_error_message()}") from None


def is_local(uri: str) -> bool:
    """Whether the daemon runs on this host: the NBD socket and scratch files must be local."""
    parts = urllib.parse.urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return transport in ("", "unix") and parts.hostname in (None, "", "localhost")


def error_text(exc: Exception) -> str:
    if isinstance(exc, libvirt.libvirtError):
        return str(exc.get_error_message() or exc)
    return str(exc)


# --- domains ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainDisk:
    """A disk of a domain as its XML describes it."""

    target: str  # <target dev=…>, the disk's name in snapfs and its NBD export name
    source: str | None  # file, block device or volume/network name (display only)
    format: str | None  # <driver type=…>
    backup: bool  # False: excluded (cdrom, floppy, read-only, shareable, empty, asked)
    reason: str = ""  # why it is excluded


def domain_disks(xml: str, skip: frozenset[str] = frozenset()) -> list[DomainDisk]:
    """The disks of a domain XML, in XML order, each marked whether a backup includes it."""
    root = ET.fromstring(xml)
    disks = []
    for disk in root.findall("./devices/disk"):
        target_el = disk.find("target")
        if target_el is None or not target_el.get("dev"):
            continue
        target = str(target_el.get("dev"))
        source_el = disk.find("source")
        source = None
        if source_el is not None:
            source = (
                source_el.get("file")
                or source_el.get("dev")
                or source_el.get("name")
                or source_el.get("volume")
            )
        driver = disk.find("driver")
        fmt = driver.get("type") if driver is not None else None
        reason = ""
        if disk.get("device", "disk") != "disk":
            reason = f"a {disk.get('device')}"
        elif source_el is None:
            reason = "no medium"
        elif disk.find("readonly") is not None:
            reason = "read-only"
        elif disk.find("shareable") is not None:
            reason = "shareable"
        elif disk.find("transient") is not None:
            reason = "transient"
        elif target in skip:
            reason = "excluded (backup='no')"
        disks.append(DomainDisk(target, source, fmt, not reason, reason))
    return disks


def domain_uuid(dom: Any) -> str:
    return str(dom.UUIDString())


def check_running(dom: Any) -> None:
    if not dom.isActive():
        raise SnapfsUserError(
            f"domain {dom.name()!r} is not running: libvirt backups and live views need a "
            "running domain (start it, or back up its images with 'snapfs repo add-snapshot')"
        )


def active_job(dom: Any) -> str | None:
    """A description of the job the domain runs (backup, migration, …), or None."""
    try:
        stats = dom.jobStats()
    except libvirt.libvirtError:
        return None
    kind = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
    if kind == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    operation = {
        libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP: "a backup",
        libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT: "an outgoing migration",
        libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE: "a save",
        libvirt.VIR_DOMAIN_JOB_OPERATION_DUMP: "a dump",
        libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT: "a snapshot",
    }.get(stats.get("operation", 0), "a job")
    return str(operation)


def checkpoint_exists(dom: Any, name: str) -> bool:
    try:
        dom.checkpointLookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


def delete_checkpoint(dom: Any, name: str) -> None:
    """Delete a checkpoint (and its bitmaps); a checkpoint already gone is fine."""
    try:
        dom.checkpointLookupByName(name).delete(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            log.warning("cannot delete checkpoint %s of %s: %s", name, dom.name(), error_text(exc))


# --- pull-mode jobs -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobDisk:
    """How one disk takes part in a pull job."""

    target: str
    incremental: str | None = None  # checkpoint the dirty bitmap is relative to


def export_bitmap(target: str) -> str:
    """The dirty-bitmap name an incremental export offers (``qemu:dirty-bitmap:<this>``)."""
    return f"backup-{target}"


def backup_xml(socket: Path, scratch_dir: Path, disks: list[JobDisk], excluded: list[str]) -> str:
    """``<domainbackup mode='pull'>`` naming every disk: included ones with their mode and
    scratch file, the others with ``backup='no'`` (an omitted disk would also be left out,
    but an explicit list says what was meant)."""
    parts = [
        "<domainbackup mode='pull'>",
        f"<server transport='unix' socket={quoteattr(str(socket))}/>",
        "<disks>",
    ]
    for disk in disks:
        mode = (
            f"backupmode='incremental' incremental={quoteattr(disk.incremental)}"
            if disk.incremental
            else "backupmode='full'"
        )
        scratch = scratch_dir / f"{disk.target}.scratch"
        parts.append(
            f"<disk name={quoteattr(disk.target)} backup='yes' type='file' {mode} "
            f"exportname={quoteattr(disk.target)} "
            f"exportbitmap={quoteattr(export_bitmap(disk.target))}>"
            f"<scratch file={quoteattr(str(scratch))}/><driver type='qcow2'/></disk>"
        )
    for target in excluded:
        parts.append(f"<disk name={quoteattr(target)} backup='no'/>")
    parts.append("</disks></domainbackup>")
    return "".join(parts)


def checkpoint_xml(name: str, description: str, disks: list[str], excluded: list[str]) -> str:
    parts = [
        "<domaincheckpoint>",
        f"<name>{_text(name)}</name><description>{_text(description)}</description><disks>",
    ]
    parts += [f"<disk name={quoteattr(t)} checkpoint='bitmap'/>" for t in disks]
    parts += [f"<disk name={quoteattr(t)} checkpoint='no'/>" for t in excluded]
    parts.append("</disks></domaincheckpoint>")
    return "".join(parts)


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class PullJob:
    """A running pull-mode backup job of one domain, and its private directory."""

    def __init__(
        self, dom: Any, directory: Path, disks: list[JobDisk], checkpoint: str | None
    ) -> None:
        self.dom = dom
        self.directory = directory
        self.socket = directory / SOCKET_NAME
        self.disks = disks
        self.checkpoint = checkpoint  # created with the job (deleted again by ``end(failed)``)
        self.ended = False

    def uri(self, target: str) -> str:
        return f"nbd+unix:///{target}?socket={self.socket}"

    @classmethod
    def begin(
        cls,
        dom: Any,
        disks: list[JobDisk],
        excluded: list[str],
        *,
        checkpoint: str | None = None,
        checkpoint_description: str = "",
        directory: Path | None = None,
        parent_dir: Path = Path("/tmp"),
    ) -> PullJob:
        """Start the job (and create ``checkpoint`` atomically with it, if given).

        ``directory`` (created 0700 if missing) holds the socket and scratch files; by
        default a new ``snapfs-job-*`` directory under ``parent_dir`` (short: unix socket
        paths must stay under 108 bytes). Raises ``SnapfsUserError`` when the domain is not
        running or already has a job, ``LibvirtError`` when libvirt refuses the job.
        """
        check_running(dom)
        end_stale_job(dom)
        busy = active_job(dom)
        if busy is not None:
            raise SnapfsUserError(
                f"domain {dom.name()!r} already has {busy} job running; wait for it or end it "
                f"with 'virsh domjobabort {dom.name()}'"
            )
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix=JOB_DIR_PREFIX, dir=parent_dir))
        else:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (directory / OWNER_FILE).write_text(f"{os.getpid()}\n")
        job = cls(dom, directory, disks, checkpoint)
        xml = backup_xml(job.socket, directory, disks, excluded)
        cp_xml = (
            checkpoint_xml(checkpoint, checkpoint_description, [d.target for d in disks], excluded)
            if checkpoint
            else None
        )
        log.debug("backupBegin %s: %s %s", dom.name(), xml, cp_xml)
        try:
            dom.backupBegin(xml, cp_xml, 0)
        except libvirt.libvirtError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise LibvirtError(
                f"cannot begin a backup of domain {dom.name()!r}: {error_text(exc)}"
            ) from None
        try:
            job.wait_for_socket()
        except BaseException:
            job.end(failed=True)
            raise
        log.info(
            "backup job of %s started (%s) on %s",
            dom.name(),
            ", ".join(
                f"{d.target}:{'incr ' + d.incremental if d.incremental else 'full'}" for d in disks
            ),
            job.socket,
        )
        return job

    def wait_for_socket(self) -> None:
        deadline = time.monotonic() + SOCKET_WAIT_S
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise LibvirtError(f"the backup job's NBD socket {self.socket} did not appear")
            time.sleep(0.02)

    def end(self, *, failed: bool = False) -> None:
        """End the job (``abortJob``), remove its directory; ``failed`` also deletes the
        checkpoint created with it, which no snapshot records (its bitmap would only cost
        write overhead in the guest's images). Safe to call twice; never raises."""
        if self.ended:
            return
        self.ended = True
        try:
            if active_job(self.dom) is not None:
                abort_job(self.dom)
        except libvirt.libvirtError as exc:
            log.warning("cannot end the backup job of %s: %s", _name(self.dom), error_text(exc))
        if failed and self.checkpoint:
            with contextlib.suppress(libvirt.libvirtError):
                delete_checkpoint(self.dom, self.checkpoint)
        shutil.rmtree(self.directory, ignore_errors=True)
        log.info("backup job of %s ended", _name(self.dom))


def abort_job(dom: Any) -> None:
    """``abortJob``, then wait until the job is gone.

    abortJob returns while QEMU still cancels the block jobs, and the domain refuses a new
    job until they are gone (seen here as a flaky "already has a job" right after an end).
    """
    dom.abortJob()
    deadline = time.monotonic() + JOB_END_WAIT_S
    while active_job(dom) is not None and time.monotonic() < deadline:
        time.sleep(0.02)


def _name(dom: Any) -> str:
    try:
        return str(dom.name())
    except libvirt.libvirtError:
        return "?"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_stale_job(dom: Any) -> bool:
    """End a backup job that a dead snapfs process left on ``dom``; True if there was one.

    Only a job whose socket is in a ``snapfs-job-*`` directory whose ``owner`` pid is gone
    (or whose directory is gone) is ended: another tool's job, or a live snapfs's, is not.
    """
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return False  # no backup job
    server = ET.fromstring(xml).find("server")
    sock = server.get("socket") if server is not None else None
    if not sock or not Path(sock).parent.name.startswith(JOB_DIR_PREFIX):
        return False
    directory = Path(sock).parent
    try:
        owner = int((directory / OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        owner = None
    if owner is not None and _pid_alive(owner):
        return False
    log.warning(
        "ending the backup job a snapfs process (pid %s) left on domain %s", owner, dom.name()
    )
    try:
        abort_job(dom)
    except libvirt.libvirtError as exc:
        log.warning("cannot end it: %s", error_text(exc))
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True
