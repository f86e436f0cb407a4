"""The loop parametrisation in conftest.py really runs tests (and their async
fixtures) on the loop their id names."""

from __future__ import annotations

import asyncio

import pytest
import uvloop


@pytest.fixture
async def fixture_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def test_runs_on_the_named_loop(request: pytest.FixtureRequest, fixture_loop: asyncio.AbstractEventLoop) -> None:
    loop = asyncio.get_running_loop()
    assert fixture_loop is loop
    if request.node.callspec.id == "uvloop":
        assert isinstance(loop, uvloop.Loop)
    else:
        assert request.node.callspec.id == "asyncio"
        assert not isinstance(loop, uvloop.Loop)
