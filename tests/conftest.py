"""Shared fixtures: the sample repository (built once per session, no appliance)."""

from __future__ import annotations

import pytest

from snapfs.sample import SampleRepository, build_sample_repository


@pytest.fixture(scope="session")
def sample_repo(tmp_path_factory: pytest.TempPathFactory) -> SampleRepository:
    return build_sample_repository(tmp_path_factory.mktemp("sample") / "repo")
