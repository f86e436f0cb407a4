"""One way for tests to wait for something: poll a predicate under a deadline.

A bare `while not cond(): sleep()` hangs until pytest-timeout kills the whole
run (300 s) when the condition never comes, and says nothing about what was
awaited. These fail after `timeout_s` with what was awaited in the message.
The timeouts are generous ceilings for a loaded 2-core machine, not
expectations: passing tests return as soon as the predicate holds.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable


def _describe(predicate: Callable[[], object], what: str) -> str:
    return what or getattr(predicate, "__name__", repr(predicate))


async def wait_until(
    predicate: Callable[[], object], timeout_s: float = 30.0, *, interval: float = 0.01, what: str = ""
) -> None:
    """Await until `predicate()` is truthy; AssertionError after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s} s: {_describe(predicate, what)}")
        await asyncio.sleep(interval)


def wait_until_blocking(
    predicate: Callable[[], object], timeout_s: float = 30.0, *, interval: float = 0.01, what: str = ""
) -> None:
    """`wait_until` for synchronous tests and helpers (blocks the calling thread)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s} s: {_describe(predicate, what)}")
        time.sleep(interval)


def wait_for_lines(
    read: Callable[[], str], pattern: str, count: int = 1, timeout: float = 30.0, *, name: str = "log"
) -> list[str]:
    """Wait until `count` lines of `read()` (an MTA's log, read anew each time)
    match the regex; those lines. TimeoutError with the log's tail otherwise."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        hits = [line for line in text.splitlines() if rx.search(line)]
        if len(hits) >= count:
            return hits
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(hits)} of {count} {name} lines match {pattern!r}; {name} tail:\n{text[-3000:]}"
            )
        time.sleep(0.1)
