"""The live point-in-time view of running libvirt domains through a real FUSE mount."""

from __future__ import annotations

import json
import os
from pathlib import Path

from snapfs.libvirt import jobs
from tests.fusemount import mounted, needs_fuse

pytestmark = [needs_fuse]

KiB = 1 << 10
MiB = 1 << 20


def test_live_mount_shows_point_in_time(make_domain, libvirtd, tmp_path: Path) -> None:
    d = make_domain("livefs", {"vda": 4 * MiB, "vdb": 2 * MiB})
    d.write("vda", MiB, 64 * KiB, 0x51)
    with mounted(libvirtd.uri, tmp_path / "m") as m:
        vm_dir = m.path / "livefs"
        snaps = os.listdir(vm_dir / "snapshots")
        assert len(snaps) == 1
        disks = vm_dir / "latest" / "disks"
        assert sorted(p for p in os.listdir(disks) if p.endswith(".img")) == ["vda.img", "vdb.img"]
        assert (disks / "vda.img").stat().st_size == 4 * MiB
        assert "<domain" in (vm_dir / "latest" / "domain.xml").read_text()
        assert jobs.active_job(d.dom) is None  # no job before the first read
        at_begin = d.snapshot()
        with open(disks / "vda.img", "rb") as f:
            assert f.read(4096) == at_begin["vda"][:4096]
            assert jobs.active_job(d.dom) is not None
            # Written after the job began: not in the view.
            d.write("vda", MiB, 64 * KiB, 0x52)
            f.seek(0)
            assert f.read() == at_begin["vda"]
        # The extent map is computed on open (size unknown when listed), through the job.
        report = json.loads((disks / "vda.extents.json").read_text())
        assert {"start": MiB, "length": 64 * KiB} in report["allocated"]
        meta = json.loads((vm_dir / "latest" / "snapshot.json").read_text())
        assert [x["name"] for x in meta["disks"]] == ["vda", "vdb"]
    # Unmount ends the job.
    assert jobs.active_job(d.dom) is None
