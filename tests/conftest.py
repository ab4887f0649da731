"""Shared fixtures: the sample repository (built once per session, no appliance)."""

from __future__ import annotations

import pytest

from snapfs.sample import SampleRepository, build_sample_repository


@pytest.fixture(scope="session")
def sample_repo(tmp_path_factory: pytest.TempPathFactory) -> SampleRepository:
    return build_sample_repository(tmp_path_factory.mktemp("sample") / "repo")


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """snapfs remembers things (the KVM verdict) in a cache dir: tests start from none."""
    import os

    saved = {k: os.environ.get(k) for k in ("SNAPFS_CACHE_DIR", "SNAPFS_CONFIG")}
    os.environ["SNAPFS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    # Mounts without --config use TCG: KVM guests hang on machines like ours, and the
    # auto fallback (tested on its own in tests/guestfs) would cost a launch timeout.
    config = tmp_path_factory.mktemp("config") / "config.toml"
    config.write_text('[guestfs]\nbackend = "tcg"\n')
    os.environ["SNAPFS_CONFIG"] = str(config)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def btrfs_ntfs_images(tmp_path_factory: pytest.TempPathFactory):
    """A btrfs disk with subvolumes and an ntfs disk (tests/guestfs/osimages.py): built once
    (one short appliance) for tests/guestfs/test_os.py and tests/integration/test_guest_os.py."""
    import shutil

    from tests.guestfs import osimages

    for tool in ("mkfs.btrfs", "sfdisk", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    return osimages.build_btrfs_ntfs(tmp_path_factory.mktemp("btrfs-ntfs"))
