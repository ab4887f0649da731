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

    old = os.environ.get("SNAPFS_CACHE_DIR")
    os.environ["SNAPFS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("SNAPFS_CACHE_DIR", None)
    else:
        os.environ["SNAPFS_CACHE_DIR"] = old
