"""The repository writer with real qemu-img and real images: init, full and incremental
snapshots in every format, relative backing paths, atomicity of add_snapshot."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from snapfs.catalog import qemu_img, repo, writer
from snapfs.catalog.repo import load_repository
from snapfs.catalog.writer import DiskSource
from snapfs.errors import SnapfsUserError

MIB = 1 << 20
CLUSTER = 64 * 1024  # qcow2 default cluster size: the granularity of an overlay


def random_raw(path: Path, size: int, ranges: list[tuple[int, int]], seed: int = 0) -> Path:
    """A sparse raw image with pseudo-random bytes in ``ranges`` (offset, length)."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in ranges:
            f.seek(offset)
            f.write(rnd.randbytes(length))
    return path


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def qemu_map(path: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    writer.init_repository(path)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return random_raw(tmp_path / "base.raw", 8 * MIB, [(0, 3 * MIB), (6 * MIB, MIB)])


def test_init_writes_marker_and_refuses_twice(tmp_path: Path) -> None:
    path = tmp_path / "r"
    writer.init_repository(path)
    marker = json.loads((path / "snapfs-repo.json").read_text())
    assert marker["format"] == "snapfs-repository"
    assert marker["version"] == 1
    assert (path / "vms").is_dir()
    assert repo.is_repository(path)
    assert load_repository(path).vms == ()
    with pytest.raises(SnapfsUserError, match="already a snapfs repository"):
        writer.init_repository(path)
    other = tmp_path / "full"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(SnapfsUserError, match="not empty"):
        writer.init_repository(other)
    assert not repo.is_repository(other)


def test_add_full_snapshot(repo_dir: Path, base: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "domain.xml"
    cfg.write_text("<domain type='kvm'><name>web</name></domain>\n")
    added = writer.add_snapshot(
        repo_dir,
        "web server",
        [DiskSource("vda", base)],
        config_files=[cfg],
        description="first",
        created=1_800_000_000.5,
    )
    assert added.vm_id == "web-server"
    assert added.parent is None
    snap_json = json.loads((added.path / "snapshot.json").read_text())
    assert snap_json["created"] == "2027-01-15T08:00:00.500Z"
    assert snap_json["disks"] == [{"name": "vda", "file": "disks/vda.qcow2", "format": "qcow2"}]
    assert snap_json["config"] == ["domain.xml"]
    assert snap_json["parent"] is None
    assert added.snapshot_id.startswith("20270115T080000Z-")

    catalog = load_repository(repo_dir)
    assert catalog.problems == ()
    (vm,) = catalog.vms
    assert (vm.id, vm.name) == ("web-server", "web server")
    (snap,) = vm.snapshots
    assert snap.created == 1_800_000_000.5
    assert snap.description == "first"
    assert snap.config_files == (added.path.resolve() / "domain.xml",)
    assert snap.config_files[0].read_bytes() == cfg.read_bytes()
    (disk,) = snap.disks
    assert disk.format == "qcow2" and disk.backing is None and disk.error is None
    assert disk.virtual_size == 8 * MIB
    assert disk.allocated == 4 * MIB  # the random ranges; holes are not data
    assert qemu_img.compare(base, disk.path, a_format="raw", b_format="qcow2")


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk", "vpc"])
def test_every_format_round_trips(repo_dir: Path, base: Path, tmp_path: Path, fmt: str) -> None:
    # The source is itself in ``fmt`` (format probed), and stored in ``fmt``.
    source = tmp_path / f"source.{fmt}"
    qemu_img.convert(base, source, src_format="raw", dst_format=fmt)
    added = writer.add_snapshot(repo_dir, "vm", [DiskSource("sda", source)], format=fmt)
    (disk,) = load_repository(repo_dir).vms[0].snapshots[0].disks
    assert disk.error is None
    assert disk.format == fmt
    assert disk.path.name == f"sda.{repo.EXTENSIONS[fmt]}"
    assert disk.path.parent == (added.path / "disks").resolve()
    assert disk.virtual_size == 8 * MIB
    assert qemu_img.compare(base, disk.path, a_format="raw", b_format=fmt)
    # An incremental snapshot on top of any format is a qcow2 overlay.
    new = tmp_path / "new.raw"
    shutil.copyfile(base, new)
    patch(new, 2 * MIB + 5, b"changed")
    writer.add_snapshot(repo_dir, "vm", [DiskSource("sda", new, "raw")], incremental=True)
    snaps = load_repository(repo_dir).vms[0].snapshots
    top = snaps[1].disks[0]
    assert top.format == "qcow2" and top.backing == disk.path
    assert qemu_img.compare(new, top.path, a_format="raw", b_format="qcow2")


def test_incremental_writes_only_changed_clusters(
    repo_dir: Path, base: Path, tmp_path: Path
) -> None:
    first = writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", base, "raw")])
    new = tmp_path / "new.raw"
    shutil.copyfile(base, new)
    patch(new, 1 * MIB + 100, b"\xff" * 10)  # inside one cluster
    patch(new, 5 * MIB, b"\x01" * (CLUSTER + 1))  # a hole becomes data: two clusters
    second = writer.add_snapshot(
        repo_dir, "vm", [DiskSource("vda", new, "raw")], incremental=True, name="second"
    )
    assert second.parent == first.snapshot_id
    overlay = second.path / "disks" / "vda.qcow2"
    own = [(e["start"], e["length"]) for e in qemu_map(overlay) if e["depth"] == 0 and e["data"]]
    assert own == [(MIB, CLUSTER), (5 * MIB, 2 * CLUSTER)]
    assert qemu_img.compare(new, overlay, a_format="raw", b_format="qcow2")
    (top,) = qemu_img.info(overlay, "qcow2")[:1]
    assert top.backing_filename == f"../../{first.snapshot_id}/disks/vda.qcow2"
    assert top.backing_format == "qcow2"
    snap_json = json.loads((second.path / "snapshot.json").read_text())
    assert snap_json["parent"] == first.snapshot_id
    catalog = load_repository(repo_dir)
    assert catalog.problems == ()
    snaps = catalog.vms[0].snapshots
    assert [s.name for s in snaps][1] == "second"
    assert snaps[1].disks[0].backing == (first.path / "disks" / "vda.qcow2").resolve()


def test_incremental_chain_grown_disk_and_new_disk(
    repo_dir: Path, base: Path, tmp_path: Path
) -> None:
    writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", base, "raw")])
    grown = random_raw(tmp_path / "grown.raw", 10 * MIB, [(9 * MIB, MIB)], seed=5)
    with open(base, "rb") as src, open(grown, "r+b") as dst:
        dst.write(src.read())
    extra = random_raw(tmp_path / "extra.raw", 2 * MIB, [(0, 4096)], seed=9)
    writer.add_snapshot(
        repo_dir,
        "vm",
        [DiskSource("vda", grown, "raw"), DiskSource("vdb", extra, "raw")],
        incremental=True,
    )
    catalog = load_repository(repo_dir)
    assert catalog.problems == ()
    vda, vdb = catalog.vms[0].snapshots[1].disks
    assert vda.virtual_size == 10 * MIB and vda.backing is not None
    assert qemu_img.compare(grown, vda.path, a_format="raw", b_format="qcow2")
    assert vdb.backing is None  # the parent has no vdb: stored in full
    assert qemu_img.compare(extra, vdb.path, a_format="raw", b_format="qcow2")


def test_moved_repository_still_loads(repo_dir: Path, base: Path, tmp_path: Path) -> None:
    writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", base, "raw")])
    new = tmp_path / "new.raw"
    shutil.copyfile(base, new)
    patch(new, 7 * MIB, b"moved")
    writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", new, "raw")], incremental=True)
    moved = tmp_path / "elsewhere" / "deeper" / "repo2"
    moved.parent.mkdir(parents=True)
    shutil.move(repo_dir, moved)
    catalog = load_repository(moved)
    assert catalog.problems == ()
    top = catalog.vms[0].snapshots[1].disks[0]
    assert top.path.is_relative_to(moved.resolve())
    assert top.backing is not None and top.backing.is_relative_to(moved.resolve())
    assert qemu_img.compare(new, top.path, a_format="raw", b_format="qcow2")


def test_incremental_needs_a_parent(repo_dir: Path, base: Path) -> None:
    with pytest.raises(SnapfsUserError, match="no snapshot to be incremental on"):
        writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", base, "raw")], incremental=True)
    writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", base, "raw")])
    with pytest.raises(SnapfsUserError, match="no readable snapshot with id 'nope'"):
        writer.add_snapshot(
            repo_dir, "vm", [DiskSource("vda", base, "raw")], incremental=True, parent="nope"
        )


def test_explicit_parent(repo_dir: Path, base: Path, tmp_path: Path) -> None:
    first = writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", base, "raw")], created=100.0)
    other = random_raw(tmp_path / "other.raw", 8 * MIB, [(0, MIB)], seed=3)
    writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", other, "raw")], created=200.0)
    third = writer.add_snapshot(
        repo_dir, "vm", [DiskSource("vda", base, "raw")], incremental=True, parent=first.snapshot_id
    )
    assert third.parent == first.snapshot_id
    overlay = third.path / "disks" / "vda.qcow2"
    # Identical to its parent: the overlay holds no data at all.
    assert [e for e in qemu_map(overlay) if e["depth"] == 0 and e["data"]] == []


def test_names_and_ids(repo_dir: Path, base: Path) -> None:
    a = writer.add_snapshot(repo_dir, "Web/Server", [DiskSource("vda", base, "raw")], created=0.0)
    b = writer.add_snapshot(repo_dir, "web server", [DiskSource("vda", base, "raw")], created=0.0)
    assert (a.vm_id, b.vm_id) == ("web-server", "web-server-2")
    assert a.name == "1970-01-01_00-00-00"
    c = writer.add_snapshot(repo_dir, "Web/Server", [DiskSource("vda", base, "raw")], created=0.0)
    assert c.vm_id == "web-server" and c.name == "1970-01-01_00-00-00-2"
    with pytest.raises(SnapfsUserError, match="already has a snapshot named"):
        writer.add_snapshot(repo_dir, "Web/Server", [DiskSource("vda", base, "raw")], name=a.name)
    # Same creation time: the order among them is by (random) id, so compare sorted names.
    names = {vm.name: sorted(s.name for s in vm.snapshots) for vm in load_repository(repo_dir).vms}
    assert names == {
        "Web/Server": ["1970-01-01_00-00-00", "1970-01-01_00-00-00-2"],
        "web server": ["1970-01-01_00-00-00"],
    }


def test_bad_input_is_a_user_error(repo_dir: Path, base: Path, tmp_path: Path) -> None:
    with pytest.raises(SnapfsUserError, match="no such image file"):
        writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", tmp_path / "nope.raw")])
    with pytest.raises(SnapfsUserError, match="disk name"):
        writer.add_snapshot(repo_dir, "vm", [DiskSource("../x", base, "raw")])
    with pytest.raises(SnapfsUserError, match="given twice"):
        writer.add_snapshot(
            repo_dir, "vm", [DiskSource("vda", base, "raw"), DiskSource("vda", base, "raw")]
        )
    bad_cfg = tmp_path / "snapshot.json"
    bad_cfg.write_text("{}")
    with pytest.raises(SnapfsUserError, match="cannot be named"):
        writer.add_snapshot(
            repo_dir, "vm", [DiskSource("vda", base, "raw")], config_files=[bad_cfg]
        )
    with pytest.raises(SnapfsUserError, match="not a snapfs repository"):
        writer.add_snapshot(tmp_path, "vm", [DiskSource("vda", base, "raw")])
    assert list((repo_dir / "vms").iterdir()) == []


def _visible_state(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("existing_vm", [False, True])
def test_interrupted_add_leaves_nothing(
    repo_dir: Path, base: Path, tmp_path: Path, existing_vm: bool
) -> None:
    if existing_vm:
        writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", base, "raw")])
    before = _visible_state(repo_dir)
    catalog_before = load_repository(repo_dir)
    calls: list[float] = []

    def interrupt(disk: str, percent: float) -> None:
        calls.append(percent)
        # Interrupt while the second disk is being written: the first one is complete.
        if disk == "vdb":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        writer.add_snapshot(
            repo_dir,
            "vm",
            [DiskSource("vda", base, "raw"), DiskSource("vdb", base, "raw")],
            incremental=existing_vm,
            progress=interrupt,
        )
    assert calls  # the copy really started
    assert _visible_state(repo_dir) == before
    assert load_repository(repo_dir) == catalog_before


def test_failed_qemu_img_leaves_nothing(repo_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake.qcow2"
    fake.write_bytes(b"not a qcow2 image" * 100)
    with pytest.raises(qemu_img.QemuImgError, match="qcow2"):
        writer.add_snapshot(repo_dir, "vm", [DiskSource("vda", fake, "qcow2")])
    assert _visible_state(repo_dir) == ["snapfs-repo.json", "vms"]


def test_convert_progress_is_reported(tmp_path: Path, base: Path) -> None:
    seen: list[float] = []
    qemu_img.convert(
        base, tmp_path / "out.qcow2", src_format="raw", dst_format="qcow2", progress=seen.append
    )
    assert seen[-1] == 100.0
    assert seen == sorted(seen) and len(seen) >= 2
