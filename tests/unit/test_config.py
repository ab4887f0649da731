"""The settings file: defaults, values, and clear errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapfs.config import Settings, load_settings
from snapfs.errors import SnapfsUserError


def test_defaults_without_a_file(tmp_path: Path) -> None:
    assert load_settings(tmp_path / "none.toml") == Settings()
    assert Settings().nbd.read_around_kb == 256


def test_read_around_setting(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[nbd]\nread_around_kb = 1024\n")
    assert load_settings(path).nbd.read_around_kb == 1024
    path.write_text("[nbd]\nread_around_kb = 0\n")
    assert load_settings(path).nbd.read_around_kb == 0
    path.write_text("[nbd]\nstore_ahead_kb = 0\n")
    assert load_settings(path).nbd.store_ahead_kb == 0
    assert Settings().nbd.store_ahead_kb == 16384
    path.write_text("[nbd]\nstore_threads = 2\n")
    assert load_settings(path).nbd.store_threads == 2
    assert Settings().nbd.store_threads == 4
    path.write_text("[nbd]\nstore_process = false\n")
    assert load_settings(path).nbd.store_process is False
    assert Settings().nbd.store_process is True
    path.write_text("[nbd]\nstore_data = false\n")
    assert load_settings(path).nbd.store_data is False
    assert Settings().nbd.store_data is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[nbd]\nread_around_kb = 6\n", "multiple of 4"),
        ("[nbd]\nread_around_kb = -4\n", "multiple of 4"),
        ("[nbd]\nread_around_kb = 32768\n", "between 0 and 16384"),
        ('[nbd]\nread_around_kb = "256"\n', "must be int"),
        ("[nbd]\nstore_ahead_kb = 1023\n", "store_ahead_kb must be a multiple of 4"),
        ("[nbd]\nstore_ahead_kb = 2097152\n", "between 0 and 1048576"),
        ('[nbd]\nstore_process = "yes"\n', "must be bool"),
        ("[nbd]\nstore_data = 1\n", "must be bool"),
        ("[nbd]\nstore_threads = 0\n", "store_threads must be between 1 and 16"),
        ("[nbd]\nstore_threads = 17\n", "store_threads must be between 1 and 16"),
        ("[nbd]\nread_arround_kb = 256\n", "unknown setting 'read_arround_kb'"),
        ("[nbd]\nconnections = 0\n", "at least 1"),
        ("[nbd\n", "cannot read settings"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(SnapfsUserError, match=message) as info:
        load_settings(path)
    assert str(path) in str(info.value)
