"""mount.end_when_disconnected: handlers still running after the kernel ended the FUSE
connection are cancelled after a grace period, never while the connection lives. The
connection is a stand-in directory here (the real one is /sys/fs/fuse/connections/N, which
only an unmount removes; the daemon's unmount paths are tested in tests/integration)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from snapfs.mount import end_when_disconnected


async def _watch_while(
    conn: Path, grace_s: float, terminate: Callable[[], None], body: Callable[[trio.Event], Any]
) -> None:
    """Run the watcher on ``conn`` while ``body(serving)`` runs, then until it ends."""
    serving = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: end_when_disconnected(
                conn, serving, poll_s=0.01, grace_s=grace_s, terminate=terminate
            )
        )
        await body(serving)


def test_terminates_after_the_grace_once_the_connection_is_gone(tmp_path: Path) -> None:
    conn = tmp_path / "42"
    conn.mkdir()
    calls: list[float] = []
    gone: list[float] = []

    async def body(_serving: trio.Event) -> None:
        await trio.sleep(0.3)
        assert calls == []  # the connection lives: nothing happens
        gone.append(trio.current_time())
        conn.rmdir()

    trio.run(_watch_while, conn, 0.2, lambda: calls.append(trio.current_time()), body)
    assert len(calls) == 1 and calls[0] - gone[0] >= 0.2


def test_no_termination_when_the_loop_returns_in_time(tmp_path: Path) -> None:
    conn = tmp_path / "43"
    conn.mkdir()
    calls: list[int] = []

    async def body(serving: trio.Event) -> None:
        await trio.sleep(0.05)
        conn.rmdir()
        await trio.sleep(0.1)
        serving.set()  # pyfuse3.main returned by itself within the grace

    trio.run(_watch_while, conn, 0.5, lambda: calls.append(1), body)
    assert calls == []


def test_without_fusectl_nothing_is_watched(tmp_path: Path) -> None:
    calls: list[int] = []

    async def main() -> None:
        with trio.fail_after(1):
            await end_when_disconnected(
                tmp_path / "missing", trio.Event(), terminate=lambda: calls.append(1)
            )

    trio.run(main)
    assert calls == []
