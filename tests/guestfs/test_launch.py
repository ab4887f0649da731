"""Launch timeout → kill → TCG fallback, and the appliance cap (no real appliance for the
pool test: fake sessions)."""

from __future__ import annotations

import pytest
import trio

from snapfs.guestfs import AppliancePool, GuestfsSettings, GuestSession, LaunchTimeout
from snapfs.guestfs.session import _KvmVerdict, find_qemu_pids


@pytest.mark.guestfs
@pytest.mark.slow
async def test_launch_timeout_kills_and_falls_back(disks: list[tuple[str, str]]) -> None:
    # A tiny KVM timeout forces the timeout path whether or not KVM works here; nothing
    # remembered from earlier runs may skip it.
    _KvmVerdict.works = None
    _KvmVerdict.loaded = True
    settings = GuestfsSettings(backend="auto", kvm_launch_timeout_s=2.0)
    s = GuestSession("timeout-test", disks[:1], settings)
    try:
        names = await s.call(lambda g, state: g.list_devices())
        assert names == ["/dev/sda"]
        assert s.last_launch_backend == "tcg"
        assert _KvmVerdict.works is False or len(s.attempt_markers) == 1
        for marker in s.attempt_markers[:-1]:
            assert find_qemu_pids(marker) == [], "timed-out qemu still running"
    finally:
        await s.aclose()
        _KvmVerdict.works = None
        _KvmVerdict.loaded = False
    for marker in s.attempt_markers:
        assert find_qemu_pids(marker) == []


@pytest.mark.guestfs
async def test_tcg_launch_timeout_is_an_error(disks: list[tuple[str, str]]) -> None:
    s = GuestSession("short", disks[:1], GuestfsSettings(backend="tcg", launch_timeout_s=1.0))
    with pytest.raises(LaunchTimeout):
        await s.call(lambda g, state: None)
    assert not s.launched
    for marker in s.attempt_markers:
        assert find_qemu_pids(marker) == []
    await s.aclose()


class FakeSession:
    def __init__(self, name: str) -> None:
        self.name = name
        self.launched = False
        self.busy = 0
        self.last_used = 0.0
        self.shutdowns = 0

    async def shutdown_appliance(self) -> None:
        self.launched = False
        self.shutdowns += 1


async def test_pool_evicts_lru_idle() -> None:
    pool = AppliancePool(GuestfsSettings(max_appliances=2, idle_timeout_s=10))
    a, b, c = FakeSession("a"), FakeSession("b"), FakeSession("c")
    for s in (a, b, c):
        pool.register(s)  # type: ignore[arg-type]
    for s, t in ((a, 1.0), (b, 2.0)):
        await pool.make_room(s)  # type: ignore[arg-type]
        s.launched, s.last_used = True, t
        pool.launch_finished(s)  # type: ignore[arg-type]
    await pool.make_room(c)  # type: ignore[arg-type]
    assert (a.shutdowns, b.shutdowns) == (1, 0)  # a was least recently used
    c.launched, c.last_used = True, trio.current_time()
    pool.launch_finished(c)  # type: ignore[arg-type]
    b.last_used = trio.current_time() - 11
    assert await pool.shutdown_idle() == 1
    assert b.shutdowns == 1 and c.launched


async def test_pool_waits_when_all_busy() -> None:
    pool = AppliancePool(GuestfsSettings(max_appliances=1))
    a, b = FakeSession("a"), FakeSession("b")
    pool.register(a)  # type: ignore[arg-type]
    pool.register(b)  # type: ignore[arg-type]
    a.launched, a.busy = True, 1
    with trio.move_on_after(0.5) as scope:
        await pool.make_room(b)  # type: ignore[arg-type]
    assert scope.cancelled_caught and a.shutdowns == 0
    a.busy = 0
    await pool.make_room(b)  # type: ignore[arg-type]
    assert a.shutdowns == 1
