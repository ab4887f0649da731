"""The live libvirt source: ``snapfs mount URI MOUNTPOINT`` on a libvirt URI.

Owns ``load_libvirt`` (the catalog: one VM per running domain, one snapshot ``now`` whose
disks are NBD URIs planned in advance) and ``LiveJobs`` (the pull-mode backup jobs behind
those URIs: one per domain, started on the first access of any of its disks, ended after
``idle_timeout`` seconds without a connected export and at unmount).

The URIs are known before any job exists. A local daemon's job always serves on
``<runtime dir>/snapfs-job-<domain uuid>/nbd.sock``, each disk under its target name
(``nbd+unix:///vda?socket=…``); the domain is found from the directory name. A remote
daemon's job (``jobs.is_local``) serves over TCP on the URI's host, on a port planned per
domain when the catalog is loaded (``[libvirt] nbd_port`` plus the domain's index in name
order), ``nbds://`` unless ``[libvirt] tls = false``; the plan (port → domain uuid) is kept
in ``<runtime dir>/tcp-ports.json``. ``ExportManager.prepare_uri`` calls
``LiveJobs.prepare`` with such a URI before connecting. Settings come from the default
settings file (``snapfs.config.load_settings``). Guest files (``files/``) of a remote
daemon's jobs reach the appliance through a local nbdkit relay per disk
(``DiskExport.acquire_relay``): the appliance attaches to unix sockets only.

Point in time: a job shows the disks as they were when it began. A job ended when idle and
started again later shows a later point in time (see the lead's notes on caching).

Thread rules: ``load_libvirt`` blocks (call it from a worker thread). ``LiveJobs`` methods
run on the trio loop; every libvirt call goes through ``trio.to_thread.run_sync``, one
``trio.Lock`` per domain serialises starting and ending its job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import libvirt
import trio

from snapfs.catalog.model import Catalog, Disk, Problem, Snapshot, Vm
from snapfs.config import LibvirtSettings, load_settings
from snapfs.errors import BackendUnavailable, SnapfsError, SnapfsUserError
from snapfs.libvirt import jobs
from snapfs.libvirt.jobs import is_libvirt_uri

log = logging.getLogger(__name__)

__all__ = ["LiveJobs", "is_libvirt_uri", "live_runtime_dir", "load_libvirt"]

SNAPSHOT_ID = "now"
# unix socket paths are limited to 108 bytes (sun_path) including the NUL.
_SUN_PATH_MAX = 107
# How often the reaper looks for jobs without connected exports.
REAP_INTERVAL_S = 2.0
# Planned TCP ports of a remote daemon's jobs: {"<port>": "<domain uuid>"}.
TCP_PLAN_FILE = "tcp-ports.json"

_runtime_dir: Path | None = None


def live_runtime_dir() -> Path:
    """The process's directory for live job sockets and scratch files (short, 0700)."""
    global _runtime_dir
    if _runtime_dir is None or not _runtime_dir.is_dir():
        _runtime_dir = Path(tempfile.mkdtemp(prefix="snapfs-live-", dir="/tmp"))
    return _runtime_dir


def job_dir(runtime_dir: Path, uuid: str) -> Path:
    return runtime_dir / f"{jobs.JOB_DIR_PREFIX}{uuid}"


def disk_uri(runtime_dir: Path, uuid: str, target: str) -> str:
    sock = job_dir(runtime_dir, uuid) / jobs.SOCKET_NAME
    if len(str(sock)) > _SUN_PATH_MAX:
        raise SnapfsUserError(f"runtime directory {runtime_dir} is too deep for unix sockets")
    return f"nbd+unix:///{target}?socket={sock}"


def _settings(settings: LibvirtSettings | None) -> LibvirtSettings:
    return settings if settings is not None else load_settings().libvirt


def load_libvirt(
    uri: str, runtime_dir: Path | None = None, settings: LibvirtSettings | None = None
) -> Catalog:
    """The live catalog of the libvirt daemon at ``uri`` (blocking).

    Each running domain is a VM (id: its uuid) with one snapshot ``now``: its disks (those a
    backup would include) with their capacity as size, and its current XML as
    ``domain.xml``. Stopped domains are left out (logged). Nothing is started here. A remote
    daemon without TLS client certificates configured is refused while TLS is required.
    """
    endpoint = jobs.remote_endpoint(uri, _settings(settings))
    runtime_dir = runtime_dir or live_runtime_dir()
    conn = jobs.open_connection(uri)
    vms: list[Vm] = []
    problems: list[Problem] = []
    plan: dict[str, str] = {}
    now = time.time()
    try:
        domains = sorted(conn.listAllDomains(), key=lambda d: str(d.name()))
        for dom in domains:
            name = str(dom.name())
            if not dom.isActive():
                log.info("domain %s is not running: not shown", name)
                continue
            uuid = jobs.domain_uuid(dom)
            try:
                if endpoint is None:
                    vms.append(_live_vm(dom, name, uuid, runtime_dir, now, None))
                    continue
                if len(plan) >= len(endpoint.ports):
                    raise SnapfsUserError(
                        f"no NBD port left for this domain ([libvirt] nbd_ports = "
                        f"{len(endpoint.ports)})"
                    )
                port = endpoint.ports[len(plan)]
                plan[str(port)] = uuid
                vms.append(_live_vm(dom, name, uuid, runtime_dir, now, (endpoint, port)))
            except (libvirt.libvirtError, SnapfsError, OSError) as exc:
                message = jobs.error_text(exc)
                problems.append(Problem(f"domain {name}", message))
                vms.append(Vm(id=uuid, name=name, error=message))
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    if endpoint is not None:
        (runtime_dir / TCP_PLAN_FILE).write_text(json.dumps(plan), encoding="utf-8")
    return Catalog(vms=tuple(sorted(vms, key=lambda v: v.name)), problems=tuple(problems))


def _live_vm(
    dom: Any,
    name: str,
    uuid: str,
    runtime_dir: Path,
    now: float,
    tcp: tuple[jobs.TcpEndpoint, int] | None,
) -> Vm:
    xml = dom.XMLDesc(0)
    config_dir = runtime_dir / "config" / uuid
    config_dir.mkdir(parents=True, exist_ok=True)
    config = config_dir / "domain.xml"
    config.write_text(xml, encoding="utf-8")
    disks = []
    for disk in jobs.domain_disks(xml):
        if not disk.backup:
            continue
        capacity = int(dom.blockInfo(disk.target)[0])
        if tcp is None:
            uri = disk_uri(runtime_dir, uuid, disk.target)
        else:
            uri = tcp[0].uri(tcp[1], disk.target)
        disks.append(
            Disk(
                name=disk.target,
                path=Path(uri),  # display only; reads go to ``uri``
                format="raw",
                virtual_size=capacity,
                # Unknown until the job runs: a sparse file must not claim fewer blocks
                # than it holds, so claim them all.
                allocated=capacity,
                uri=uri,
            )
        )
    snapshot = Snapshot(
        id=SNAPSHOT_ID,
        name=SNAPSHOT_ID,
        created=now,
        description="live view: a pull-mode backup job, started on first access",
        disks=tuple(disks),
        config_files=(config,),
    )
    return Vm(id=uuid, name=name, snapshots=(snapshot,))


class _Export(Protocol):
    uri: str | None

    @property
    def running(self) -> bool: ...


class _Exports(Protocol):
    @property
    def exports(self) -> Iterable[_Export]: ...


class LiveJobs:
    """The pull-mode jobs behind a live libvirt catalog (see the module doc)."""

    def __init__(
        self,
        uri: str,
        runtime_dir: Path | None = None,
        *,
        idle_timeout: float = 60.0,
        settings: LibvirtSettings | None = None,
    ) -> None:
        self.uri = uri
        self.runtime_dir = runtime_dir or live_runtime_dir()
        self.endpoint = jobs.remote_endpoint(uri, _settings(settings))
        self.idle_timeout = idle_timeout
        self._conn: Any = None
        self._jobs: dict[str, jobs.PullJob] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._last_used: dict[str, float] = {}

    def _uuid_of(self, nbd_uri: str) -> str | None:
        parts = urllib.parse.urlsplit(nbd_uri)
        if self.endpoint is not None:
            if parts.scheme not in ("nbd", "nbds") or parts.hostname != self.endpoint.host:
                return None
            return self._planned().get(str(parts.port))
        query = urllib.parse.parse_qs(parts.query)
        sock = Path(query.get("socket", [""])[0])
        directory = sock.parent
        if directory.parent != self.runtime_dir or not directory.name.startswith(
            jobs.JOB_DIR_PREFIX
        ):
            return None
        return directory.name.removeprefix(jobs.JOB_DIR_PREFIX)

    def _domain(self, uuid: str) -> Any:
        if self._conn is None or not self._alive():
            self._conn = jobs.open_connection(self.uri)
        try:
            return self._conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            raise SnapfsUserError(f"domain {uuid} is gone") from None

    def _planned(self) -> dict[str, str]:
        """The planned TCP ports of a remote daemon's jobs (port → domain uuid)."""
        try:
            plan = json.loads((self.runtime_dir / TCP_PLAN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in plan.items()} if isinstance(plan, dict) else {}

    def _port_of(self, uuid: str) -> int:
        for port, planned in self._planned().items():
            if planned == uuid:
                return int(port)
        raise SnapfsUserError(f"domain {uuid} has no planned NBD port (reload the mount)")

    def _alive(self) -> bool:
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _begin(self, uuid: str) -> jobs.PullJob:
        dom = self._domain(uuid)
        disks = jobs.domain_disks(dom.XMLDesc(0))
        included = [jobs.JobDisk(d.target) for d in disks if d.backup]
        excluded = [d.target for d in disks if not d.backup]
        endpoint = self.endpoint
        if endpoint is not None:
            # The URIs are planned: this domain's port only, no other.
            endpoint = dataclasses.replace(endpoint, ports=(self._port_of(uuid),))
        return jobs.PullJob.begin(
            dom, included, excluded, directory=job_dir(self.runtime_dir, uuid), endpoint=endpoint
        )

    async def prepare(self, uri: str) -> None:
        """Make sure the job serving ``uri`` runs (start it on first use); URIs that are not
        ours are left alone. Raises ``BackendUnavailable`` with the reason (domain not
        running, already has a job, libvirt refused)."""
        uuid = self._uuid_of(uri)
        if uuid is None:
            return
        lock = self._locks.setdefault(uuid, trio.Lock())
        async with lock:
            self._last_used[uuid] = time.monotonic()
            job = self._jobs.get(uuid)
            if job is not None and job.serving:
                return
            if job is not None:
                await trio.to_thread.run_sync(job.end)
                del self._jobs[uuid]
            try:
                self._jobs[uuid] = await trio.to_thread.run_sync(self._begin, uuid)
            except SnapfsUserError as exc:
                raise BackendUnavailable(str(exc)) from None
            self._last_used[uuid] = time.monotonic()

    async def end(self, uuid: str) -> None:
        lock = self._locks.setdefault(uuid, trio.Lock())
        with trio.CancelScope(shield=True):
            async with lock:
                # Listed as running until libvirt has really ended it.
                job = self._jobs.get(uuid)
                if job is not None:
                    await trio.to_thread.run_sync(job.end)
                    del self._jobs[uuid]

    async def reap_idle(self, exports: _Exports) -> None:
        """End jobs none of whose exports has been connected for ``idle_timeout`` seconds
        (runs until cancelled; the ExportManager's own reaper disconnects idle exports)."""
        while True:
            await trio.sleep(min(REAP_INTERVAL_S, self.idle_timeout / 2))
            now = time.monotonic()
            in_use = {
                self._uuid_of(e.uri) for e in exports.exports if e.uri is not None and e.running
            }
            for uuid in list(self._jobs):
                if uuid in in_use:
                    self._last_used[uuid] = now
                elif now - self._last_used.get(uuid, now) >= self.idle_timeout:
                    log.info("ending the idle live backup job of domain %s", uuid)
                    await self.end(uuid)

    @property
    def running(self) -> list[str]:
        """The uuids of domains whose job runs (or is being ended)."""
        return list(self._jobs)

    async def aclose(self) -> None:
        """End every job, close the connection, remove the runtime directory."""
        with trio.CancelScope(shield=True):
            for uuid in list(self._jobs):
                await self.end(uuid)
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    await trio.to_thread.run_sync(conn.close)
            global _runtime_dir
            if self.runtime_dir == _runtime_dir:
                _runtime_dir = None
            if self.runtime_dir.name.startswith("snapfs-live-") and os.path.isdir(self.runtime_dir):
                shutil.rmtree(self.runtime_dir, ignore_errors=True)
