"""Restore disks in a repository: naming, creation, listing, export, commit and removal.

Real qemu-img and small images written with qemu-io: a 4 MiB disk with a few patterned
ranges, stored as a full snapshot, so every cluster that changes is known exactly.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from snapfs.catalog import qemu_img, repo, writer
from snapfs.restore import store
from snapfs.restore.model import CreateSpec
from tests.imaging import run, sparse_raw

MIB = 1 << 20
CLUSTER = 64 * 1024


@pytest.fixture
def small_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    writer.init_repository(root)
    raw = sparse_raw(tmp_path / "vda.raw", 4 * MIB, [(0, CLUSTER, 0x11), (2 * MIB, CLUSTER, 0x22)])
    cfg = tmp_path / "domain.xml"
    cfg.write_text("<domain><name>vm1</name></domain>\n", encoding="utf-8")
    writer.add_snapshot(
        root, "vm1", [writer.DiskSource("vda", raw, "raw")], config_files=[cfg], name="s1"
    )
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x33 {MIB} {CLUSTER}", raw)
    writer.add_snapshot(
        root, "vm1", [writer.DiskSource("vda", raw, "raw")], incremental=True, name="s2"
    )
    return root


def _snapshot_image(root: Path, name: str) -> Path:
    for snap_dir in (root / "vms" / "vm1" / "snapshots").iterdir():
        data = json.loads((snap_dir / "snapshot.json").read_text())
        if data["name"] == name:
            return snap_dir / data["disks"][0]["file"]
    raise AssertionError(name)


def _same(a: Path, b: Path, a_fmt: str = "qcow2", b_fmt: str = "qcow2") -> bool:
    return qemu_img.compare(a, b, a_format=a_fmt, b_format=b_fmt)


def _top_data(image: Path) -> list[tuple[int, int]]:
    """(start, length) of the extents stored in ``image`` itself, not its backing files."""
    return [
        (e.start, e.length) for e in qemu_img.map_extents(image, "qcow2") if e.data and e.depth == 0
    ]


# --- names and the mkdir convention -------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "a/b", "a\0b", "x" * 201, "é" * 101],
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(store.RestoreError):
        store.validate_name(name)


def test_long_name_says_too_long() -> None:
    with pytest.raises(store.RestoreError) as info:
        store.validate_name("x" * 201)
    assert info.value.errno == errno.ENAMETOOLONG


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10G", 10 << 30),
        ("512M", 512 * MIB),
        ("1073741824", 1 << 30),
        ("64KiB", 65536),
        ("1000", 1024),
        ("2t", 2 << 40),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert store.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1G", "10X", "1.5G", "G", "1 G B"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(store.RestoreError):
        store.parse_size(text)


def test_dirname_convention() -> None:
    assert store.spec_from_dirname("web-01@latest@vda") == CreateSpec(
        name="web-01@latest@vda", vm="web-01", snapshot="latest", disk="vda"
    )
    assert store.spec_from_dirname("scratch@10G") == CreateSpec(name="scratch@10G", size=10 << 30)


@pytest.mark.parametrize("dirname", ["plain", "a@b@c@d", "@10G", "x@", "a@@vda", "x@ten"])
def test_dirname_convention_errors_explain_it(dirname: str) -> None:
    with pytest.raises(store.RestoreError) as info:
        store.spec_from_dirname(dirname)
    assert "VM@SNAPSHOT@DISK" in str(info.value)
    assert "\n" not in str(info.value)


# --- mounts -------------------------------------------------------------------------------


def test_mount_parser_finds_the_repository(tmp_path: Path) -> None:
    root = tmp_path / "my repo"
    root.mkdir()
    text = (
        "proc /proc proc rw 0 0\n"
        f"snapfs:{tmp_path}/my\\040repo /mnt/b\\040ackup fuse.snapfs ro,nosuid 0 0\n"
        f"snapfs:{tmp_path}/other /mnt/other fuse.snapfs ro 0 0\n"
        f"sshfs:{tmp_path}/my\\040repo /mnt/x fuse.sshfs rw 0 0\n"
    )
    assert store.mounts_of_repository(root, text) == [Path("/mnt/b ackup")]
    assert store.repository_of_mount(Path("/mnt/b ackup"), text) == root
    assert store.repository_of_mount(Path("/mnt/x"), text) is None
    with pytest.raises(store.RestoreError) as info:
        store.ensure_not_mounted(root, "remove it", text)
    assert info.value.errno == errno.EBUSY and "/mnt/b ackup" in str(info.value)
    store.ensure_not_mounted(root, "remove it", "proc /proc proc rw 0 0\n")


def test_rm_refused_while_mounted(small_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_restore(small_repo, CreateSpec(name="r", size=MIB))
    mounts = small_repo.parent / "mounts"
    mounts.write_text(f"snapfs:{small_repo} /mnt/s fuse.snapfs ro 0 0\n")
    monkeypatch.setattr(store, "_MOUNTS_FILE", mounts)
    with pytest.raises(store.RestoreError, match="mounted at /mnt/s"):
        store.remove_restore(small_repo, "r")
    assert store.get_restore(small_repo, "r").error is None
    store.remove_restore(small_repo, "r", force=True)
    assert store.list_restores(small_repo) == ([], [])


# --- creation -----------------------------------------------------------------------------


def test_cow_restore_reads_like_the_snapshot_and_copies_nothing(small_repo: Path) -> None:
    disk = store.create_restore(
        small_repo, CreateSpec(name="", vm="vm1", snapshot="s1", disk="vda")
    )
    assert disk.name == "vm1@s1@vda"
    assert disk.virtual_size == 4 * MIB
    assert disk.source is not None and disk.source.snapshot_name == "s1"
    s1 = _snapshot_image(small_repo, "s1")
    assert _same(disk.path, s1)
    assert not _same(disk.path, _snapshot_image(small_repo, "s2"))
    assert _top_data(disk.path) == []
    (top,) = qemu_img.info(disk.path, "qcow2", chain=False)
    assert top.backing_filename is not None
    assert top.backing_filename.startswith("../../vms/vm1/snapshots/")
    saved = json.loads((disk.path.parent / "restore.json").read_text())
    assert saved["source"]["disk"] == "vda" and saved["format"] == "qcow2"
    assert saved["virtual_size"] == 4 * MIB


def test_latest_and_ids_resolve(small_repo: Path) -> None:
    latest = store.create_restore(small_repo, CreateSpec(name="l", vm="vm1", disk="vda"))
    assert latest.source is not None and latest.source.snapshot_name == "s2"
    by_id = store.create_restore(
        small_repo, CreateSpec(name="i", vm="vm1", snapshot=latest.source.snapshot_id, disk="vda")
    )
    assert _same(by_id.path, _snapshot_image(small_repo, "s2"))


def test_relative_backing_survives_moving_the_repository(small_repo: Path, tmp_path: Path) -> None:
    store.create_restore(small_repo, CreateSpec(name="r", vm="vm1", snapshot="s2", disk="vda"))
    moved = tmp_path / "elsewhere"
    small_repo.rename(moved)
    (disk,), problems = store.list_restores(moved)
    assert problems == [] and disk.error is None
    assert disk.path == moved / "restore" / "r" / "disk.qcow2"
    assert _same(disk.path, _snapshot_image(moved, "s2"))


def test_empty_restore_has_the_size(small_repo: Path) -> None:
    disk = store.create_restore(small_repo, CreateSpec(name="e@3M", size=3 * MIB + 1))
    assert disk.source is None
    assert disk.virtual_size == 3 * MIB + 512
    (top,) = qemu_img.info(disk.path, "qcow2", chain=False)
    assert top.virtual_size == 3 * MIB + 512 and top.backing_filename is None
    assert _top_data(disk.path) == []


def test_default_names_are_unique(small_repo: Path) -> None:
    names = [
        store.create_restore(small_repo, CreateSpec(name="", vm="vm1", disk="vda")).name
        for _ in range(2)
    ]
    assert names == ["vm1@s2@vda", "vm1@s2@vda-2"]
    assert store.create_restore(small_repo, CreateSpec(name="", size=MIB)).name == "empty"


@pytest.mark.parametrize(
    ("spec", "message", "code"),
    [
        (CreateSpec(name="x", vm="nope", disk="vda"), "no VM named 'nope'", errno.ENOENT),
        (CreateSpec(name="x", vm="vm1", snapshot="s9", disk="vda"), "no snapshot", errno.ENOENT),
        (CreateSpec(name="x", vm="vm1", disk="vdz"), "no usable disk 'vdz'", errno.ENOENT),
        (CreateSpec(name="x", vm="vm1", disk="vda", size=MIB), "not both", errno.EINVAL),
        (CreateSpec(name="x"), "or a size", errno.EINVAL),
        (CreateSpec(name="x", vm="vm1"), "needs the VM and the disk", errno.EINVAL),
        (CreateSpec(name="../x", size=MIB), "must not contain", errno.EINVAL),
    ],
)
def test_bad_specs(small_repo: Path, spec: CreateSpec, message: str, code: int) -> None:
    with pytest.raises(store.RestoreError, match=message) as info:
        store.create_restore(small_repo, spec)
    assert info.value.errno == code
    assert not (small_repo / "restore").exists() or not any((small_repo / "restore").iterdir())


def test_name_in_use(small_repo: Path) -> None:
    store.create_restore(small_repo, CreateSpec(name="r", size=MIB))
    with pytest.raises(store.RestoreError, match="exists") as info:
        store.create_restore(small_repo, CreateSpec(name="r", size=MIB))
    assert info.value.errno == errno.EEXIST


def test_failed_creation_leaves_nothing(small_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise qemu_img.QemuImgError("disk full")

    monkeypatch.setattr(qemu_img, "create_overlay", boom)
    with pytest.raises(qemu_img.QemuImgError):
        store.create_restore(small_repo, CreateSpec(name="r", vm="vm1", disk="vda"))
    assert list((small_repo / "restore").iterdir()) == []


def test_catalog_ignores_restore_disks(small_repo: Path) -> None:
    store.create_restore(small_repo, CreateSpec(name="r", vm="vm1", disk="vda"))
    catalog = repo.load_repository(small_repo)
    assert catalog.problems == ()
    assert [vm.name for vm in catalog.vms] == ["vm1"]


# --- listing ------------------------------------------------------------------------------


def test_broken_entries_are_listed(small_repo: Path) -> None:
    good = store.create_restore(small_repo, CreateSpec(name="good", vm="vm1", disk="vda"))
    orphan = store.create_restore(
        small_repo, CreateSpec(name="orphan", vm="vm1", snapshot="s2", disk="vda")
    )
    # Deleting the snapshot the overlay backs onto breaks only that restore disk.
    shutil.rmtree(_snapshot_image(small_repo, "s2").parent.parent)
    (small_repo / "restore" / "nojson").mkdir()
    (small_repo / "restore" / ".tmp-left").mkdir()
    (small_repo / "restore" / "stray.txt").write_text("x")
    disks, problems = store.list_restores(small_repo)
    by_name = {d.name: d for d in disks}
    assert sorted(by_name) == ["good", "nojson", "orphan"]
    assert by_name["nojson"].error == "restore.json: file is missing"
    assert by_name["orphan"].error is not None and "disk.qcow2" in by_name["orphan"].error
    # "good" was made from s2 as well (latest at the time): also broken now.
    assert good.source is not None and good.source.snapshot_name == "s2"
    assert by_name["good"].error is not None
    assert orphan.name == "orphan"
    assert {Path(p.where).name for p in problems} == {"good", "nojson", "orphan", "stray.txt"}


def test_get_missing(small_repo: Path) -> None:
    with pytest.raises(store.RestoreError, match="no restore disk named 'x'") as info:
        store.get_restore(small_repo, "x")
    assert info.value.errno == errno.ENOENT


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(store.RestoreError, match="not a snapfs repository"):
        store.list_restores(tmp_path)


# --- export -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vpc"])
def test_export_after_writing(small_repo: Path, tmp_path: Path, fmt: str) -> None:
    disk = store.create_restore(small_repo, CreateSpec(name="r", vm="vm1", disk="vda"))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x44 {3 * MIB} {CLUSTER}", disk.path)
    out = tmp_path / f"out.{fmt}"
    phases: list[tuple[str, float]] = []
    store.export_restore(small_repo, "r", out, fmt, lambda p, v: phases.append((p, v)))
    assert _same(out, disk.path, fmt, "qcow2")
    assert not _same(out, _snapshot_image(small_repo, "s2"), fmt, "qcow2")
    assert qemu_img.info(out, fmt, chain=False)[0].virtual_size == 4 * MIB
    assert qemu_img.info(out, fmt, chain=False)[0].backing_filename is None
    assert ("export", 100.0) in phases and phases[-1] == ("verify", 100.0)
    if fmt == "raw":
        # Sparse: four 64 KiB ranges of data in a 4 MiB file.
        assert out.stat().st_blocks * 512 <= 8 * CLUSTER
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_export_refuses_to_overwrite(small_repo: Path, tmp_path: Path) -> None:
    store.create_restore(small_repo, CreateSpec(name="r", size=MIB))
    out = tmp_path / "out.raw"
    out.write_text("keep me")
    with pytest.raises(store.RestoreError, match="already exists"):
        store.export_restore(small_repo, "r", out, "raw")
    assert out.read_text() == "keep me"
    store.export_restore(small_repo, "r", out, "raw", overwrite=True)
    assert out.stat().st_size == MIB


def test_export_failed_verification_keeps_nothing(
    small_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create_restore(small_repo, CreateSpec(name="r", size=MIB))
    monkeypatch.setattr(qemu_img, "compare", lambda *a, **k: False)
    with pytest.raises(qemu_img.QemuImgError, match="verification failed"):
        store.export_restore(small_repo, "r", tmp_path / "out.raw", "raw")
    assert list(tmp_path.glob("*out.raw*")) == []


# --- commit -------------------------------------------------------------------------------


def test_commit_stores_only_the_changed_clusters(small_repo: Path) -> None:
    disk = store.create_restore(
        small_repo, CreateSpec(name="r", vm="vm1", snapshot="s1", disk="vda")
    )
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x55 {3 * MIB} {CLUSTER}", disk.path)
    assert disk.source is not None
    added = store.commit_restore(small_repo, "r", "vm1", description="restored")
    # The parent is the restore disk's source (s1), not the newest snapshot (s2).
    assert added.parent == disk.source.snapshot_id
    data = json.loads((added.path / "snapshot.json").read_text())
    assert data["description"] == "restored"
    assert data["config"] == ["domain.xml"]
    image = added.path / data["disks"][0]["file"]
    assert _same(image, disk.path)
    assert _top_data(image) == [(3 * MIB, CLUSTER)]
    catalog = repo.load_repository(small_repo)
    assert catalog.problems == ()
    assert [s.name for s in catalog.vms[0].snapshots][:2] == ["s1", "s2"]
    assert len(catalog.vms[0].snapshots) == 3


def test_commit_to_a_new_vm_is_full(small_repo: Path) -> None:
    disk = store.create_restore(small_repo, CreateSpec(name="r", size=MIB))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x66 0 {CLUSTER}", disk.path)
    added = store.commit_restore(small_repo, "r", "fresh")
    assert added.parent is None
    data = json.loads((added.path / "snapshot.json").read_text())
    assert data["disks"][0]["name"] == "vda"
    assert _same(added.path / data["disks"][0]["file"], disk.path)
