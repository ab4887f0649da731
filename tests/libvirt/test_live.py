"""The live libvirt view: catalog of running domains, one pull-mode job per domain started on
first access, point-in-time reads through the mount's exports, idle end, clear errors."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import trio

from snapfs.config import NbdSettings
from snapfs.errors import BackendUnavailable
from snapfs.libvirt import jobs
from snapfs.libvirt.source import LiveJobs, is_libvirt_uri, load_libvirt
from snapfs.nbd.export import ExportManager
from tests import imaging
from tests.libvirt.daemon import domain_xml

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    # Short: the job sockets live inside (108-byte limit); named like the real one so that
    # LiveJobs.aclose removes it.
    d = Path(tempfile.mkdtemp(prefix="snapfs-live-", dir="/tmp"))
    try:
        yield d
    finally:
        assert not list(d.glob("snapfs-job-*")) if d.exists() else True
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def export_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="snapfs-t-", dir="/tmp") as d:
        os.chmod(d, 0o700)
        yield Path(d)


async def read_all(export: Any, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = await export.read(len(out), 1 * MiB)
        assert chunk
        out += chunk
    return bytes(out)


def test_is_libvirt_uri() -> None:
    assert is_libvirt_uri("qemu:///system")
    assert is_libvirt_uri("qemu+unix:///system?socket=/tmp/x")
    assert is_libvirt_uri("qemu+ssh://root@host/system")
    assert not is_libvirt_uri("/backups/repo")
    assert not is_libvirt_uri("nbd+unix:///vda?socket=/tmp/s")
    assert not is_libvirt_uri("sources.toml")


async def test_live_view_point_in_time(
    make_domain, libvirtd, conn, runtime_dir: Path, export_dir: Path, tmp_path: Path
) -> None:
    d = make_domain("live", {"vda": 4 * MiB, "vdb": 2 * MiB})
    d.write("vda", 0, 64 * KiB, 0x31)
    d.write("vdb", MiB, 4 * KiB, 0x32)
    image = tmp_path / "stopped.qcow2"
    imaging.run("qemu-img", "create", "-q", "-f", "qcow2", image, "1M")
    stopped = conn.defineXML(domain_xml("stopped", [("vda", image)]))
    try:
        catalog = await trio.to_thread.run_sync(load_libvirt, libvirtd.uri, runtime_dir)
    finally:
        stopped.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    assert not catalog.problems
    (vm,) = catalog.vms  # the stopped domain is not shown
    assert vm.name == "live" and vm.id == d.dom.UUIDString()
    (snap,) = vm.snapshots
    assert [(x.name, x.virtual_size) for x in snap.disks] == [("vda", 4 * MiB), ("vdb", 2 * MiB)]
    assert snap.config_files[0].name == "domain.xml"
    assert all(x.uri and len(x.uri.split("socket=")[1]) < 108 for x in snap.disks)
    assert jobs.active_job(d.dom) is None  # nothing starts before the first access

    live = LiveJobs(libvirtd.uri, runtime_dir)
    at_begin = d.snapshot()
    async with trio.open_nursery() as nursery:
        exports = ExportManager(export_dir, nursery, NbdSettings())
        exports.prepare_uri = live.prepare
        vda = exports.export_for_uri(snap.disks[0].uri or "")
        vdb = exports.export_for_uri(snap.disks[1].uri or "")
        try:
            await vda.acquire()
            assert jobs.active_job(d.dom) == "a backup"
            # Written after the job began: not visible in the view.
            await trio.to_thread.run_sync(d.write, "vda", 0, 64 * KiB, 0x41)
            await trio.to_thread.run_sync(d.write, "vdb", 0, 4 * KiB, 0x42)
            assert await read_all(vda, 4 * MiB) == at_begin["vda"]
            await vdb.acquire()  # the same job serves every disk of the domain
            assert live.running == [vm.id]
            assert await read_all(vdb, 2 * MiB) == at_begin["vdb"]
            vda.release()
            vdb.release()
        finally:
            await exports.stop_all()
            await live.aclose()
            nursery.cancel_scope.cancel()
    assert jobs.active_job(d.dom) is None
    assert not runtime_dir.exists()


async def test_live_job_errors_and_idle_end(
    make_domain, libvirtd, runtime_dir: Path, export_dir: Path
) -> None:
    d = make_domain("live-busy", {"vda": 2 * MiB})
    catalog = await trio.to_thread.run_sync(load_libvirt, libvirtd.uri, runtime_dir)
    (disk,) = catalog.vms[0].snapshots[0].disks
    assert disk.uri is not None
    live = LiveJobs(libvirtd.uri, runtime_dir, idle_timeout=0.5)
    other = await trio.to_thread.run_sync(
        lambda: jobs.PullJob.begin(d.dom, [jobs.JobDisk("vda")], [])
    )
    try:
        with pytest.raises(BackendUnavailable, match="already has a backup job"):
            await live.prepare(disk.uri)
    finally:
        await trio.to_thread.run_sync(other.end)

    async with trio.open_nursery() as nursery:
        exports = ExportManager(export_dir, nursery, NbdSettings())
        exports.prepare_uri = live.prepare
        export = exports.export_for_uri(disk.uri)
        nursery.start_soon(live.reap_idle, exports)
        try:
            await export.acquire()
            export.release()
            await trio.sleep(1.5)
            assert live.running  # connected: the job stays
            await export.stop()
            with trio.fail_after(60):
                while live.running:
                    await trio.sleep(0.1)
            assert jobs.active_job(d.dom) is None
            # The next access starts a new job.
            await export.acquire()
            assert live.running
            export.release()
        finally:
            await exports.stop_all()
            await live.aclose()
            nursery.cancel_scope.cancel()
    assert jobs.active_job(d.dom) is None

    # A domain that stopped since the catalog was loaded: a clear error.
    await trio.to_thread.run_sync(d.dom.destroy)
    live = LiveJobs(libvirtd.uri, runtime_dir.parent / "snapfs-live-gone")
    with pytest.raises(BackendUnavailable, match=r"gone|not running"):
        await live.prepare(disk.uri.replace(str(runtime_dir), str(live.runtime_dir)))
    await live.aclose()
