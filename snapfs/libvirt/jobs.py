"""libvirt connections, domain disks and pull-mode backup jobs.

Owns everything that talks to libvirt: opening a connection (``open_connection``), which
URIs are remote (``is_local``) and how a remote job is reached (``TcpEndpoint``,
``remote_endpoint``), reading a domain's disks from its XML (``domain_disks``), the backup
and checkpoint XML, and ``PullJob``: one ``virDomainBackupBegin`` in pull mode with its
private directory, ended by ``PullJob.end`` (``abortJob``, which also makes libvirt delete
the socket and the scratch files; the directory is removed here).

Two transports. A local daemon (``qemu:///system``, ``qemu+unix://…``, no host name): the
NBD server is a unix socket and the scratch files are in the private directory. A remote
one (any URI with a host name or a transport other than unix): the NBD server listens on
TCP on the URI's host (a port from a configured range, TLS by default) and the scratch files
are made on the libvirt host, beside each disk image or in a configured directory there.

A job left behind by a process that died (Ctrl-C during a libvirt outage, ``kill -9``) is
recognised as ours and stale by ``end_stale_job``, so the next run can end it and proceed:
a unix job by the ``owner`` file (pid) in its private directory, a TCP job by its scratch
file names, which carry the pid and a hash of this host's name.

Thread rules: everything here blocks (libvirt RPCs). Callers on the trio loop use
``trio.to_thread.run_sync``. A libvirt connection may be shared between threads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import libvirt

from snapfs.config import LibvirtSettings
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
    """Whether the daemon is reached over a local unix socket (``qemu:///system``,
    ``qemu+unix:///system?socket=…``): then its job's NBD unix socket and scratch files are
    usable here. Any URI with a host name (even ``localhost`` or ``127.0.0.1``) or with a
    transport other than unix (tcp, ssh, tls, libssh…) counts as remote: its job serves
    NBD over TCP on that host."""
    parts = urllib.parse.urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return transport in ("", "unix") and not parts.hostname


# TLS files libnbd reads from a client certificate directory (``nbd_set_tls_certificates``).
CLIENT_TLS_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


@dataclass(frozen=True)
class TcpEndpoint:
    """How the pull-mode job of a remote daemon serves NBD, and how we connect to it."""

    host: str  # QEMU listens on this name on the libvirt host; we connect to it
    ports: tuple[int, ...]  # candidates, tried in order until QEMU can bind one
    tls: bool
    certificates: Path | None = None  # client directory (CLIENT_TLS_FILES) when tls
    scratch_dir: str | None = None  # on the libvirt host; None: beside each disk image

    def uri(self, port: int, export: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "nbds" if self.tls else "nbd"
        query = ""
        if self.tls and self.certificates is not None:
            query = "?" + urllib.parse.urlencode({"tls-certificates": str(self.certificates)})
        return f"{scheme}://{host}:{port}/{urllib.parse.quote(export)}{query}"


def remote_endpoint(
    uri: str,
    settings: LibvirtSettings,
    *,
    port: int | None = None,
    tls: bool | None = None,
    certificates: str | None = None,
    scratch_dir: str | None = None,
) -> TcpEndpoint | None:
    """The TCP endpoint for jobs of the daemon at ``uri`` (None for a local one); keyword
    arguments override ``settings``. Refuses (``SnapfsUserError``) TLS without client
    certificates: disk contents would cross the network in clear."""
    if is_local(uri):
        return None
    host = urllib.parse.urlsplit(uri).hostname
    if not host:
        # qemu+ssh:///system and the like: the daemon is on this host, reached another way.
        host = "localhost"
    first = settings.nbd_port if port is None else port
    count = settings.nbd_ports if port is None else 1
    use_tls = settings.tls if tls is None else tls
    certs = settings.tls_certificates if certificates is None else certificates
    cert_dir: Path | None = None
    if use_tls:
        if not certs:
            raise SnapfsUserError(
                f"{uri}: the backup job of a remote libvirt host serves the disks over TCP, "
                "and TLS is required ([libvirt] tls = true, the default), but no client "
                "certificates are configured: set [libvirt] tls_certificates = DIR in the "
                "settings file or pass --tls-certificates DIR (with "
                f"{', '.join(CLIENT_TLS_FILES)}), or --no-tls to send disk contents in clear"
            )
        cert_dir = Path(certs).expanduser().resolve()
        missing = [f for f in CLIENT_TLS_FILES if not (cert_dir / f).is_file()]
        if missing:
            raise SnapfsUserError(f"{cert_dir}: TLS client directory lacks {', '.join(missing)}")
    scratch = settings.scratch_dir if scratch_dir is None else scratch_dir
    return TcpEndpoint(
        host=host,
        ports=tuple(range(first, first + count)),
        tls=use_tls,
        certificates=cert_dir,
        scratch_dir=scratch or None,
    )


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


def lost_connection(dom: Any) -> str | None:
    """Why the connection behind ``dom`` no longer answers (libvirtd died or was restarted),
    or None when it does. ``active_job`` and ``PullJob.end`` cannot tell a job that ended
    from a daemon that is gone; a backup asks this before it commits."""
    try:
        dom.connect().getLibVersion()
    except libvirt.libvirtError as exc:
        return error_text(exc)
    return None


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


def unix_server_xml(sock: Path) -> str:
    return f"<server transport='unix' socket={quoteattr(str(sock))}/>"


def tcp_server_xml(host: str, port: int, tls: bool) -> str:
    return (
        f"<server transport='tcp' name={quoteattr(host)} port='{port}' "
        f"tls='{'yes' if tls else 'no'}'/>"
    )


def backup_xml(
    server: str, scratch: dict[str, str | None], disks: list[JobDisk], excluded: list[str]
) -> str:
    """``<domainbackup mode='pull'>`` with the ``<server>`` element ``server``, naming every
    disk: included ones with their mode and scratch file (``scratch[target]``; None: libvirt
    picks one), the others with ``backup='no'`` (an omitted disk would also be left out, but
    an explicit list says what was meant)."""
    parts = ["<domainbackup mode='pull'>", server, "<disks>"]
    for disk in disks:
        mode = (
            f"backupmode='incremental' incremental={quoteattr(disk.incremental)}"
            if disk.incremental
            else "backupmode='full'"
        )
        file = scratch.get(disk.target)
        scratch_el = f"<scratch file={quoteattr(file)}/>" if file else ""
        parts.append(
            f"<disk name={quoteattr(disk.target)} backup='yes' type='file' {mode} "
            f"exportname={quoteattr(disk.target)} "
            f"exportbitmap={quoteattr(export_bitmap(disk.target))}>"
            f"{scratch_el}<driver type='qcow2'/></disk>"
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


def host_id() -> str:
    """A short hash of this host's name, written into the scratch file names of TCP jobs."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def scratch_name(pid: int, target: str) -> str:
    return f"{JOB_DIR_PREFIX}{pid}-{host_id()}-{target}.scratch"


_SCRATCH_RE = re.compile(rf"^{re.escape(JOB_DIR_PREFIX)}(\d+)-([0-9a-f]{{8}})-")


def _scratch_files(endpoint: TcpEndpoint, dom: Any, disks: list[JobDisk]) -> dict[str, str | None]:
    """Scratch files of a TCP job, on the libvirt host: in ``endpoint.scratch_dir`` or beside
    each disk image; a disk that is not a file (a block device, a network disk) without a
    configured directory gets None (libvirt's choice)."""
    sources = {d.target: d.source for d in domain_disks(dom.XMLDesc(0))}
    files: dict[str, str | None] = {}
    for disk in disks:
        name = scratch_name(os.getpid(), disk.target)
        source = sources.get(disk.target)
        if endpoint.scratch_dir:
            files[disk.target] = f"{endpoint.scratch_dir.rstrip('/')}/{name}"
        elif source and source.startswith("/") and not source.startswith("/dev/"):
            files[disk.target] = f"{os.path.dirname(source)}/{name}"
        else:
            files[disk.target] = None
    return files


def _port_in_use_here(host: str, port: int) -> bool:
    """Whether ``host:port`` is already bound on this machine (only known when ``host`` is
    an address of this machine; otherwise False and QEMU's bind decides)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def _bind_failed(message: str) -> bool:
    text = message.lower()
    return "address already in use" in text or "failed to bind" in text


class PullJob:
    """A running pull-mode backup job of one domain, and its private directory."""

    def __init__(
        self,
        dom: Any,
        directory: Path,
        disks: list[JobDisk],
        checkpoint: str | None,
        endpoint: TcpEndpoint | None = None,
    ) -> None:
        self.dom = dom
        self.directory = directory
        self.socket = directory / SOCKET_NAME  # unix jobs only
        self.disks = disks
        self.checkpoint = checkpoint  # created with the job (deleted again by ``end(failed)``)
        self.endpoint = endpoint  # TCP jobs only
        self.port: int | None = None  # the port QEMU listens on (TCP jobs)
        self.ended = False

    def uri(self, target: str) -> str:
        """The libnbd URI of one disk's export."""
        if self.endpoint is None:
            return f"nbd+unix:///{target}?socket={self.socket}"
        assert self.port is not None
        return self.endpoint.uri(self.port, target)

    @property
    def serving(self) -> bool:
        """Whether the job still looks alive from here (its unix socket exists)."""
        return not self.ended and (self.endpoint is not None or self.socket.exists())

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
        endpoint: TcpEndpoint | None = None,
    ) -> PullJob:
        """Start the job (and create ``checkpoint`` atomically with it, if given).

        ``directory`` (created 0700 if missing) holds the socket and scratch files of a unix
        job; by default a new ``snapfs-job-*`` directory under ``parent_dir`` (short: unix
        socket paths must stay under 108 bytes). With ``endpoint`` the job serves NBD over
        TCP: each of ``endpoint.ports`` is tried until QEMU can bind one. Raises
        ``SnapfsUserError`` when the domain is not running or already has a job,
        ``LibvirtError`` when libvirt refuses the job.
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
        job = cls(dom, directory, disks, checkpoint, endpoint)
        cp_xml = (
            checkpoint_xml(checkpoint, checkpoint_description, [d.target for d in disks], excluded)
            if checkpoint
            else None
        )
        try:
            if endpoint is None:
                scratch: dict[str, str | None] = {
                    d.target: str(directory / f"{d.target}.scratch") for d in disks
                }
                job._begin(
                    backup_xml(unix_server_xml(job.socket), scratch, disks, excluded), cp_xml
                )
                job.wait_for_socket()
            else:
                job._begin_tcp(endpoint, excluded, cp_xml)
        except BaseException:
            if active_job(dom) is not None or (checkpoint and checkpoint_exists(dom, checkpoint)):
                job.end(failed=True)
            else:
                job.ended = True
                shutil.rmtree(directory, ignore_errors=True)
            raise
        log.info(
            "backup job of %s started (%s) on %s",
            dom.name(),
            ", ".join(
                f"{d.target}:{'incr ' + d.incremental if d.incremental else 'full'}" for d in disks
            ),
            job.uri(disks[0].target) if disks else job.socket,
        )
        return job

    def _begin(self, xml: str, cp_xml: str | None) -> None:
        log.debug("backupBegin %s: %s %s", _name(self.dom), xml, cp_xml)
        try:
            self.dom.backupBegin(xml, cp_xml, 0)
        except libvirt.libvirtError as exc:
            raise LibvirtError(
                f"cannot begin a backup of domain {_name(self.dom)!r}: {error_text(exc)}"
            ) from None

    def _begin_tcp(self, endpoint: TcpEndpoint, excluded: list[str], cp_xml: str | None) -> None:
        scratch = _scratch_files(endpoint, self.dom, self.disks)
        last = ""
        for port in endpoint.ports:
            if len(endpoint.ports) > 1 and _port_in_use_here(endpoint.host, port):
                continue
            xml = backup_xml(
                tcp_server_xml(endpoint.host, port, endpoint.tls), scratch, self.disks, excluded
            )
            try:
                self._begin(xml, cp_xml)
            except LibvirtError as exc:
                if not _bind_failed(exc.message):
                    raise
                last = exc.message
                log.info("NBD port %d on %s is taken: %s", port, endpoint.host, exc.message)
                continue
            self.port = port
            return
        first, end = endpoint.ports[0], endpoint.ports[-1]
        raise LibvirtError(
            f"no free NBD port for the backup job of {_name(self.dom)!r} on {endpoint.host} "
            f"(tried {first}-{end}; [libvirt] nbd_port, nbd_ports or --nbd-port choose others)"
            + (f": {last}" if last else "")
        )

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


def end_stale_job(dom: Any) -> str | None:
    """End a backup job that a dead snapfs process left on ``dom``; a message saying so, or
    None when there was none.

    A unix job is ours when its socket is in a ``snapfs-job-*`` directory; it is stale when
    the ``owner`` pid there is gone (or the directory is). A TCP job is ours when its scratch
    files are named by ``scratch_name``; it is stale when they name this host and a pid that
    is gone. Another tool's job, a live snapfs's, or one started from another host is not
    touched.
    """
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return None  # no backup job
    root = ET.fromstring(xml)
    server = root.find("server")
    sock = server.get("socket") if server is not None else None
    directory: Path | None = None
    owner: int | None = None
    if sock:
        if not Path(sock).parent.name.startswith(JOB_DIR_PREFIX):
            return None
        directory = Path(sock).parent
        try:
            owner = int((directory / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            owner = None
    else:
        owners = set()
        for scratch in root.findall("./disks/disk/scratch"):
            match = _SCRATCH_RE.match(os.path.basename(scratch.get("file") or ""))
            if match:
                owners.add((int(match.group(1)), match.group(2)))
        if len(owners) != 1:
            return None
        ((owner, host),) = owners
        if host != host_id():
            return None  # started from another machine: its pid means nothing here
    if owner is not None and _pid_alive(owner):
        return None
    who = f"pid {owner}, gone" if owner is not None else "its job directory is gone"
    message = f"ended the backup job a snapfs process ({who}) left on domain {_name(dom)}"
    log.warning("%s", message)
    try:
        abort_job(dom)
    except libvirt.libvirtError as exc:
        log.warning("cannot end it: %s", error_text(exc))
        return None
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
    return message


def snapfs_checkpoints(dom: Any) -> dict[str, str]:
    """The checkpoints snapfs made on ``dom`` (by name prefix) with their descriptions."""
    found = {}
    try:
        checkpoints = dom.listAllCheckpoints(0)
    except libvirt.libvirtError as exc:
        log.warning("cannot list the checkpoints of %s: %s", _name(dom), error_text(exc))
        return {}
    for cp in checkpoints:
        name = str(cp.getName())
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            desc = ET.fromstring(cp.getXMLDesc(0)).findtext("description") or ""
        except (libvirt.libvirtError, ET.ParseError):
            desc = ""
        found[name] = desc
    return found
