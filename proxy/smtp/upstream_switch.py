"""A next hop that can be replaced while transactions hold connections to
the old one (SIGHUP with a changed [upstream], proxy/reload.py).

The sessions only ever see this object (`ctx.upstream`). New leases come
from the current pool; every connection goes back to the pool it came from,
so an old pool's accounting stays right, and the old pool is closed once its
last lease is back: a transaction in progress finishes on the next hop it
started with, the next one uses the new.
"""

from __future__ import annotations

import asyncio

import structlog

from proxy.smtp.upstream import Hop, Upstream

log = structlog.get_logger("triaged.upstream")


class SwitchableUpstream:
    def __init__(self, current: Upstream) -> None:
        self.current = current
        self._origin: dict[Hop, Upstream] = {}  # leased hop -> the pool it came from
        self._retired: dict[Upstream, asyncio.Event] = {}  # old pools -> "no leases left"
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.current.start()

    async def acquire(self, *, fresh: bool = False) -> Hop:
        pool = self.current
        hop = await pool.acquire(fresh=fresh)
        self._origin[hop] = pool
        return hop

    def release(self, hop: Hop, *, clean: bool) -> None:
        pool = self._give_back(hop)
        pool.release(hop, clean=clean)

    def recycle(self, hop: Hop) -> None:
        pool = self._give_back(hop)
        pool.recycle(hop)

    def _give_back(self, hop: Hop) -> Upstream:
        pool = self._origin.pop(hop, self.current)
        done = self._retired.get(pool)
        if done is not None and not any(p is pool for p in self._origin.values()):
            done.set()
        return pool

    @property
    def in_use(self) -> int:
        """Connections out of every pool (the current and those retiring)."""
        pools = [self.current, *self._retired]
        return sum(int(getattr(p, "in_use", 0)) for p in pools)

    def leases_of(self, pool: Upstream) -> int:
        return sum(1 for p in self._origin.values() if p is pool)

    def switch(self, new: Upstream) -> None:
        """New transactions use `new` from now on (it is started already);
        the old pool closes in the background after its last lease is back."""
        old, self.current = self.current, new
        done = asyncio.Event()
        self._retired[old] = done
        if self.leases_of(old) == 0:
            done.set()
        task = asyncio.get_running_loop().create_task(self._retire(old, done))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _retire(self, old: Upstream, done: asyncio.Event) -> None:
        await done.wait()
        try:
            await old.close()  # waits for its RSETs/QUITs in the background
        except Exception as exc:
            log.warning("upstream_close_failed", error=str(exc))
        self._retired.pop(old, None)
        log.info("upstream_retired")

    async def close(self) -> None:
        """Server stop: every lease is back by now (sessions are closed)."""
        for done in self._retired.values():
            done.set()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self.current.close()
