"""The fsync policy shared by the event spool and the JSON-lines file.

"always": fsync after every write call; "interval": at most every
fsync_interval_s (the owner also calls `sync()` on a timer, so the last write
is not left unsynced when no further one comes); "never": leave it to the OS.
Blocking: like its subclasses, call from one thread.
"""

from __future__ import annotations

import os
import time
from typing import Literal

FsyncPolicy = Literal["always", "interval", "never"]


class FsyncedFile:
    """Bookkeeping of one append fd under a policy. Subclasses own `_fd` and
    set `_dirty = True` after each write."""

    def __init__(self, fsync: FsyncPolicy, fsync_interval_s: float) -> None:
        self._fsync = fsync
        self._fsync_interval_s = fsync_interval_s
        self._fd: int | None = None
        self._last_sync = time.monotonic()
        self._dirty = False

    def _sync_per_policy(self) -> None:
        """After a write call: fsync if the policy says it is due now."""
        if self._fsync == "always" or (
            self._fsync == "interval"
            and time.monotonic() - self._last_sync >= self._fsync_interval_s
        ):
            self.sync()

    def sync(self) -> None:
        """fsync unsynced writes (policy interval: the owner calls it on a timer)."""
        if self._fd is not None and self._dirty and self._fsync != "never":
            os.fsync(self._fd)
        self._dirty = False
        self._last_sync = time.monotonic()

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def last_sync(self) -> float:
        """time.monotonic() of the last fsync (or open)."""
        return self._last_sync
