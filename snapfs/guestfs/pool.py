"""AppliancePool: the cap on live appliances (LRU eviction of idle ones) and idle shutdown.

Sessions register themselves; before a launch a session asks ``make_room``, which shuts down
the least recently used idle appliance while the cap is reached. ``run()`` is a long-running
task (start it in the mount's nursery) that shuts down appliances idle for longer than
``idle_timeout_s`` and, every ``DRAIN_TICK_S``, has each session apply the deferred changes
no call has carried for that long (``GuestSession.drain``: restore disks' chmod/chown/utimens).
Shutting down keeps each session's caches: the next access relaunches.

Thread rules: everything here runs on the trio loop; the shutdowns themselves go through
``GuestSession.shutdown_appliance`` (worker threads).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .settings import GuestfsSettings

if TYPE_CHECKING:
    from .session import GuestSession

log = logging.getLogger(__name__)

# How often make_room looks again when every live appliance is busy.
_ROOM_POLL_S = 0.2
# How long a deferred change may wait for a call to carry it before the pool applies it.
DRAIN_TICK_S = 0.5


class AppliancePool:
    def __init__(self, settings: GuestfsSettings | None = None) -> None:
        self.settings = settings or GuestfsSettings()
        self._sessions: list[GuestSession] = []
        self._launching: set[GuestSession] = set()

    def register(self, session: GuestSession) -> None:
        self._sessions.append(session)

    def unregister(self, session: GuestSession) -> None:
        if session in self._sessions:
            self._sessions.remove(session)
        self._launching.discard(session)

    def live(self) -> list[GuestSession]:
        return [s for s in self._sessions if s.launched]

    async def make_room(self, session: GuestSession) -> None:
        """Wait until ``session`` may launch without exceeding ``max_appliances``."""
        warned = False
        while True:
            others = [s for s in self.live() if s is not session]
            count = len(others) + len(self._launching - {session})
            if count < self.settings.max_appliances:
                # Counted as live until launch_finished: two launches cannot both take the
                # last slot.
                self._launching.add(session)
                return
            idle = [s for s in others if s.busy == 0]
            if idle:
                victim = min(idle, key=lambda s: s.last_used)
                log.info("guestfs: %d appliances live (cap): shutting down LRU %s",
                         count, victim.name)
                await victim.shutdown_appliance()
                continue
            if not warned:
                log.info("guestfs %s: waiting for a free appliance slot", session.name)
                warned = True
            await trio.sleep(_ROOM_POLL_S)

    def launch_finished(self, session: GuestSession) -> None:
        self._launching.discard(session)

    async def shutdown_idle(self) -> int:
        """Shut down every appliance idle for longer than ``idle_timeout_s``; how many."""
        now = trio.current_time()
        count = 0
        for s in self.live():
            if s.busy == 0 and now - s.last_used >= self.settings.idle_timeout_s:
                log.info("guestfs %s: idle for %.0f s: shutting down", s.name, now - s.last_used)
                await s.shutdown_appliance()
                count += 1
        return count

    async def run(self) -> None:
        """Idle reaper and deferred-change drain: runs until cancelled."""
        interval = max(1.0, min(self.settings.idle_timeout_s / 4, 30.0))
        next_reap = trio.current_time() + interval
        while True:
            await trio.sleep(DRAIN_TICK_S)
            for s in list(self._sessions):
                await s.drain(older_than=DRAIN_TICK_S)
            if trio.current_time() >= next_reap:
                next_reap = trio.current_time() + interval
                await self.shutdown_idle()

    async def aclose(self) -> None:
        """Shut down every appliance (sessions stay usable and relaunch on demand)."""
        with trio.CancelScope(shield=True):
            for s in list(self._sessions):
                await s.shutdown_appliance()
