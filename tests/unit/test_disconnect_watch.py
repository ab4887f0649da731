"""mount.end_when_disconnected: handlers still running after the kernel ended the FUSE
connection are cancelled after a grace period, never while the connection lives. The
connection is a stand-in directory here (the real one is /sys/fs/fuse/connections/N, which
only an unmount removes; the daemon's unmount paths are tested in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import trio

from snapfs.mount import end_when_disconnected


def test_terminates_after_the_grace_once_the_connection_is_gone(tmp_path: Path) -> None:
    conn = tmp_path / "42"
    conn.mkdir()
    calls: list[float] = []

    async def main() -> None:
        serving = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: end_when_disconnected(
                    conn, serving, poll_s=0.01, grace_s=0.2,
                    terminate=lambda: calls.append(trio.current_time()),
                )
            )
            await trio.sleep(0.3)
            assert calls == []  # the connection lives: nothing happens
            gone = trio.current_time()
            conn.rmdir()
        assert len(calls) == 1 and calls[0] - gone >= 0.2

    trio.run(main)


def test_no_termination_when_the_loop_returns_in_time(tmp_path: Path) -> None:
    conn = tmp_path / "43"
    conn.mkdir()
    calls: list[int] = []

    async def main() -> None:
        serving = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: end_when_disconnected(
                    conn, serving, poll_s=0.01, grace_s=0.5, terminate=lambda: calls.append(1)
                )
            )
            await trio.sleep(0.05)
            conn.rmdir()
            await trio.sleep(0.1)
            serving.set()  # pyfuse3.main returned by itself within the grace

    trio.run(main)
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
