"""The repository loader on broken repositories: every problem names its file, the broken
entry is kept with ``error`` set, and everything else still loads."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapfs.catalog import qemu_img, repo, writer
from snapfs.catalog.model import Catalog, Snapshot, Vm
from snapfs.catalog.repo import ImageCache, load_repository
from snapfs.catalog.writer import DiskSource
from snapfs.errors import RepositoryError

MIB = 1 << 20


@dataclass
class Repo:
    root: Path
    alpha_full: Path  # snapshot directories
    alpha_incr: Path
    beta: Path
    alpha_new: Path  # what the newest alpha snapshot should read as


def raw(path: Path, seed: int) -> Path:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(2 * MIB)
        f.write(rnd.randbytes(256 * 1024))
    return path


@pytest.fixture
def r(tmp_path: Path) -> Repo:
    root = tmp_path / "repo"
    writer.init_repository(root)
    a1 = raw(tmp_path / "a1.raw", 1)
    a2 = tmp_path / "a2.raw"
    shutil.copyfile(a1, a2)
    with open(a2, "r+b") as f:
        f.seek(MIB)
        f.write(b"second")
    b1 = raw(tmp_path / "b1.raw", 2)
    full = writer.add_snapshot(root, "alpha", [DiskSource("vda", a1, "raw")], created=1000.0)
    incr = writer.add_snapshot(
        root, "alpha", [DiskSource("vda", a2, "raw")], incremental=True, created=2000.0
    )
    cfg = tmp_path / "config.ovf"
    cfg.write_text("<ovf:Envelope/>\n")
    beta = writer.add_snapshot(
        root, "beta", [DiskSource("sda", b1, "raw")], config_files=[cfg], created=1500.0
    )
    return Repo(root, full.path, incr.path, beta.path, a2)


def load(root: Path) -> Catalog:
    # A fresh cache per load: these tests break files between loads.
    return load_repository(root, cache=ImageCache())


def vm(catalog: Catalog, name: str) -> Vm:
    (found,) = [v for v in catalog.vms if v.name == name]
    return found


def snap(v: Vm, snap_dir: Path) -> Snapshot:
    (found,) = [s for s in v.snapshots if s.id == snap_dir.name]
    return found


def problems(catalog: Catalog) -> list[str]:
    return [str(p) for p in catalog.problems]


def assert_beta_ok(catalog: Catalog) -> None:
    beta = vm(catalog, "beta")
    assert beta.error is None
    (s,) = beta.snapshots
    assert s.error is None
    (d,) = s.disks
    assert d.error is None and d.virtual_size == 2 * MIB and d.allocated == 256 * 1024


def test_clean_repository(r: Repo) -> None:
    catalog = load(r.root)
    assert catalog.problems == ()
    assert [v.name for v in catalog.vms] == ["alpha", "beta"]
    alpha = vm(catalog, "alpha")
    assert [s.id for s in alpha.snapshots] == [r.alpha_full.name, r.alpha_incr.name]
    assert alpha.latest() == alpha.snapshots[1]
    full, incr = alpha.snapshots
    assert incr.parent == full.id
    assert incr.disks[0].backing == full.disks[0].path
    assert incr.disks[0].allocated == 256 * 1024 + 64 * 1024  # through the chain
    assert incr.disks[0].file_size < full.disks[0].file_size
    assert_beta_ok(catalog)


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="not a snapfs repository"):
        load_repository(tmp_path)
    assert not repo.is_repository(tmp_path)
    with pytest.raises(RepositoryError, match="not a directory"):
        load_repository(tmp_path / "missing")


def test_marker_problems(r: Repo) -> None:
    marker = r.root / "snapfs-repo.json"
    marker.write_text('{"format": "snapfs-repository", "version": 99}')
    with pytest.raises(RepositoryError, match="version 99 is newer"):
        load(r.root)
    marker.write_text("{nope")
    with pytest.raises(RepositoryError, match=r"snapfs-repo.json: malformed JSON"):
        load(r.root)


def test_malformed_vm_json(r: Repo) -> None:
    vm_file = r.alpha_full.parent.parent / "vm.json"
    vm_file.write_text('{"id": "alpha", "name": "alpha",')
    catalog = load(r.root)
    assert len(catalog.problems) == 1
    (problem,) = catalog.problems
    assert problem.where == str(r.root / "vms" / "alpha" / "vm.json")
    assert problem.message.startswith("malformed JSON:")
    alpha = vm(catalog, "alpha")  # kept under its directory name
    assert alpha.error is not None and "malformed JSON" in alpha.error
    assert_beta_ok(catalog)


def test_vm_json_bad_field(r: Repo) -> None:
    (r.beta.parent.parent / "vm.json").write_text('{"id": "beta", "name": 42}')
    catalog = load(r.root)
    assert problems(catalog) == [
        f"{r.root}/vms/beta/vm.json: field 'name' must be a non-empty string"
    ]
    assert vm(catalog, "beta").error is not None
    assert vm(catalog, "alpha").error is None


def test_malformed_snapshot_json(r: Repo) -> None:
    (r.alpha_full / "snapshot.json").write_text("[1, 2")
    catalog = load(r.root)
    alpha = vm(catalog, "alpha")
    broken = snap(alpha, r.alpha_full)
    assert broken.error is not None and "malformed JSON" in broken.error
    assert broken.disks == ()
    assert broken.created == 0.0 or broken.name == r.alpha_full.name
    good = snap(alpha, r.alpha_incr)
    assert good.error is None and good.disks[0].error is None
    assert alpha.latest() == good
    assert [p.where for p in catalog.problems] == [str(r.alpha_full / "snapshot.json")]
    assert_beta_ok(catalog)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("created", "yesterday", "field 'created': not an RFC 3339 time"),
        ("created", "2026-01-01T00:00:00", "field 'created': time has no UTC offset"),
        ("disks", {"vda": 1}, "field 'disks' must be a list"),
        ("disks", [{"name": "vda", "file": "../../x", "format": "raw"}], "relative path"),
        ("disks", [{"name": "vda", "file": "d.raw", "format": "vdi"}], "disks[0].format"),
        ("disks", [{"name": "a/b", "file": "d.raw", "format": "raw"}], "disks[0].name"),
        ("config", "x.ovf", "field 'config' must be a list"),
    ],
)
def test_snapshot_json_bad_fields(r: Repo, field: str, value: object, message: str) -> None:
    path = r.beta / "snapshot.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    catalog = load(r.root)
    (problem,) = catalog.problems
    assert problem.where == str(path)
    assert message in problem.message
    assert vm(catalog, "beta").snapshots[0].error == problem.message
    assert vm(catalog, "alpha").snapshots[1].disks[0].error is None


def test_missing_image(r: Repo) -> None:
    image = r.beta / "disks" / "sda.qcow2"
    image.unlink()
    catalog = load(r.root)
    assert problems(catalog) == [f"{image}: image file is missing"]
    beta = vm(catalog, "beta")
    assert beta.snapshots[0].error is None  # the snapshot is listed, its disk is broken
    (disk,) = beta.snapshots[0].disks
    assert disk.error == "image file is missing"
    assert disk.path == image.resolve()
    assert vm(catalog, "alpha").latest() is not None


def test_missing_backing_file(r: Repo) -> None:
    base = r.alpha_full / "disks" / "vda.qcow2"
    base.unlink()
    catalog = load(r.root)
    where = {p.where: p.message for p in catalog.problems}
    assert where[str(base)] == "image file is missing"
    top = r.alpha_incr / "disks" / "vda.qcow2"
    assert where[str(top)] == (
        f"backing file ../../{r.alpha_full.name}/disks/vda.qcow2 of vda.qcow2 is missing "
        f"({base.resolve()})"
    )
    alpha = vm(catalog, "alpha")
    assert snap(alpha, r.alpha_incr).disks[0].error == where[str(top)]
    assert_beta_ok(catalog)


def test_looping_backing_file(r: Repo) -> None:
    base = r.alpha_full / "disks" / "vda.qcow2"
    # The full snapshot's image now claims the incremental one as its backing file.
    subprocess.run(
        [
            "qemu-img",
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            f"../../{r.alpha_incr.name}/disks/vda.qcow2",
            "-F",
            "qcow2",
            str(base),
        ],
        check=True,
    )
    catalog = load(r.root)
    alpha = vm(catalog, "alpha")
    for s in alpha.snapshots:
        assert s.disks[0].error is not None and "backing chain loops" in s.disks[0].error
    assert len(catalog.problems) == 2
    assert {p.where for p in catalog.problems} == {
        str(r.alpha_full / "disks" / "vda.qcow2"),
        str(r.alpha_incr / "disks" / "vda.qcow2"),
    }
    assert alpha.latest() is not None  # snapshots are listed; their disks answer EIO
    assert_beta_ok(catalog)


def test_corrupt_qcow2_header(r: Repo) -> None:
    image = r.beta / "disks" / "sda.qcow2"
    with open(image, "r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * 4)
    catalog = load(r.root)
    (problem,) = catalog.problems
    assert problem.where == str(image)
    assert "not in qcow2 format" in problem.message
    assert vm(catalog, "beta").snapshots[0].disks[0].error == problem.message
    assert vm(catalog, "alpha").snapshots[1].disks[0].error is None


def test_truncated_qcow2(r: Repo) -> None:
    image = r.beta / "disks" / "sda.qcow2"
    os.truncate(image, 50)
    catalog = load(r.root)
    (problem,) = catalog.problems
    assert problem.where == str(image)
    assert "header too short" in problem.message
    assert vm(catalog, "beta").snapshots[0].disks[0].error == problem.message


def test_corrupt_l1_table(r: Repo) -> None:
    # A header that parses but points the L1 table past the end of the file.
    image = r.beta / "disks" / "sda.qcow2"
    with open(image, "r+b") as f:
        f.seek(40)  # l1_table_offset
        f.write((1 << 50).to_bytes(8, "big"))
    catalog = load(r.root)
    (problem,) = catalog.problems
    assert problem.where == str(image)
    assert problem.message == "image is corrupt (qemu-img check found 1 error(s))"
    assert vm(catalog, "beta").snapshots[0].disks[0].error == problem.message


def test_duplicate_vm_names(r: Repo) -> None:
    (r.beta.parent.parent / "vm.json").write_text('{"id": "beta", "name": "alpha"}')
    catalog = load(r.root)
    (problem,) = catalog.problems
    assert problem.where == str(r.root / "vms" / "beta" / "vm.json")
    assert "duplicate VM name 'alpha'" in problem.message
    names = sorted((v.id, v.name) for v in catalog.vms)
    assert names == [("alpha", "alpha"), ("beta", "alpha [beta]")]
    assert all(v.error is None for v in catalog.vms)  # both still readable
    # Deterministic: the same names on every load.
    assert sorted((v.id, v.name) for v in load(r.root).vms) == names


def test_duplicate_snapshot_names(r: Repo) -> None:
    path = r.alpha_incr / "snapshot.json"
    data = json.loads(path.read_text())
    data["name"] = json.loads((r.alpha_full / "snapshot.json").read_text())["name"]
    path.write_text(json.dumps(data))
    catalog = load(r.root)
    (problem,) = catalog.problems
    assert problem.where == str(path)
    assert "duplicate snapshot name" in problem.message
    full, incr = vm(catalog, "alpha").snapshots
    assert incr.name == f"{full.name} [{incr.id}]"
    assert incr.error is None and incr.disks[0].error is None


def test_missing_config_and_parent(r: Repo) -> None:
    (r.beta / "config.ovf").unlink()
    path = r.alpha_incr / "snapshot.json"
    data = json.loads(path.read_text())
    data["parent"] = "19700101T000000Z-000000"
    path.write_text(json.dumps(data))
    catalog = load(r.root)
    assert sorted(problems(catalog)) == sorted(
        [
            f"{r.beta / 'config.ovf'}: configuration file is missing",
            f"{path}: parent snapshot '19700101T000000Z-000000' does not exist",
        ]
    )
    beta = vm(catalog, "beta").snapshots[0]
    assert beta.config_files == (r.beta.resolve() / "config.ovf",)  # still listed
    assert beta.error is None


def test_absolute_backing_path(r: Repo) -> None:
    top = r.alpha_incr / "disks" / "vda.qcow2"
    base = (r.alpha_full / "disks" / "vda.qcow2").resolve()
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
        check=True,
    )
    catalog = load(r.root)
    (problem,) = catalog.problems
    assert problem.where == str(top)
    assert "backing file path is absolute" in problem.message
    assert vm(catalog, "alpha").snapshots[1].disks[0].error is None  # still readable


def test_stray_entries_and_work_dirs(r: Repo) -> None:
    (r.root / "vms" / "notes.txt").write_text("hello")
    work = r.alpha_full.parent / ".tmp-20990101T000000Z-abcdef"
    (work / "disks").mkdir(parents=True)
    (work / "snapshot.json").write_text("{")
    catalog = load(r.root)
    assert problems(catalog) == [
        f"{r.root}/vms/notes.txt: unexpected file (not a directory); ignored"
    ]
    assert [s.id for s in vm(catalog, "alpha").snapshots] == [r.alpha_full.name, r.alpha_incr.name]


def test_problem_paths_follow_the_given_path(r: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    (r.beta / "disks" / "sda.qcow2").unlink()
    monkeypatch.chdir(r.root.parent)
    catalog = load_repository(Path("repo"), cache=ImageCache())
    (problem,) = catalog.problems
    assert problem.where == f"repo/vms/beta/snapshots/{r.beta.name}/disks/sda.qcow2"
    assert vm(catalog, "beta").snapshots[0].disks[0].path.is_absolute()


def test_cache_reuses_facts_until_a_file_changes(r: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ImageCache()
    first = load_repository(r.root, cache=cache)
    calls: list[Path] = []
    real_info = qemu_img.info

    def counting_info(
        path: Path, fmt: str, *, chain: bool = True, timeout: float = 60.0
    ) -> list[qemu_img.ImageInfo]:
        calls.append(path)
        return real_info(path, fmt, chain=chain, timeout=timeout)

    monkeypatch.setattr(qemu_img, "info", counting_info)
    assert load_repository(r.root, cache=cache) == first
    assert calls == []
    # Rewriting the base image: only it is probed again, but the allocation of both alpha
    # disks is recomputed (the chain of the incremental one changed).
    base = r.alpha_full / "disks" / "vda.qcow2"
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1536k 64k", str(base)],
        check=True,
        capture_output=True,
    )
    again = load_repository(r.root, cache=cache)
    assert calls == [base.resolve()]
    alpha = vm(again, "alpha")
    assert alpha.snapshots[0].disks[0].allocated == 256 * 1024 + 64 * 1024
    assert alpha.snapshots[1].disks[0].allocated == 256 * 1024 + 2 * 64 * 1024
