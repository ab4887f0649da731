"""The remembered KVM verdict: per kernel, for a week, in SNAPFS_CACHE_DIR."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from snapfs.guestfs import session


def test_verdict_round_trip_and_expiry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPFS_CACHE_DIR", str(tmp_path))
    assert session._load_verdict() is None
    session._save_verdict(False)
    assert session.verdict_path() == tmp_path / "kvm-verdict.json"
    assert session._load_verdict() is False
    data = json.loads(session.verdict_path().read_text())
    # Another kernel: not trusted.
    session.verdict_path().write_text(json.dumps({**data, "kernel": "other"}))
    assert session._load_verdict() is None
    # Too old: not trusted.
    session.verdict_path().write_text(json.dumps({**data, "at": time.time() - 8 * 86400}))
    assert session._load_verdict() is None
    session.verdict_path().write_text("garbage")
    assert session._load_verdict() is None
    session._save_verdict(True)
    assert session._load_verdict() is True
