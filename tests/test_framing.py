"""The loop-side frame connection (classifier/framing.py) over a real
socketpair, on both event loops: frames that arrive split or coalesced, a
corrupted stream, a peer that goes away."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from classifier import worker_wire as wire
from classifier.framing import FrameTooLarge
from classifier.inference import BatchTiming
from classifier.types import Classification


def results(category: str) -> wire.Results:
    return wire.Results([Classification(category=category, score=0.5, model="m/1")],
                        BatchTiming(0.0, 0.0, 0.0, 0.0))


async def connected() -> tuple[wire.ParentConnection, socket.socket]:
    ours, theirs = socket.socketpair()
    _, conn = await asyncio.get_running_loop().create_unix_connection(
        wire.parent_connection, sock=ours)
    return conn, theirs


async def test_frames_split_and_coalesced_arrive_whole_and_in_order() -> None:
    conn, peer = await connected()
    try:
        one, two, three = (bytes(wire.encode(results(c))) for c in ("a", "b", "c"))
        stream = one + two + three
        peer.sendall(stream[:3])  # not even a whole length
        await asyncio.sleep(0.01)
        assert conn.poll() == []
        peer.sendall(stream[3:len(one) + 5])
        first = await asyncio.wait_for(conn.receive(), 5)
        peer.sendall(stream[len(one) + 5:])
        rest = [await asyncio.wait_for(conn.receive(), 5) for _ in range(2)]
    finally:
        conn.close()
        peer.close()
    got = [f.verdicts[0] for f in (first, *rest) if isinstance(f, wire.Results)]
    assert [v.category for v in got if isinstance(v, Classification)] == ["a", "b", "c"]


async def test_a_corrupted_length_fails_the_connection() -> None:
    conn, peer = await connected()
    try:
        peer.sendall(struct.pack(">I", wire.MAX_FRAME + 1) + b"x")
        with pytest.raises(FrameTooLarge):
            await asyncio.wait_for(conn.receive(), 5)
        with pytest.raises(FrameTooLarge):  # and every later receive
            await asyncio.wait_for(conn.receive(), 5)
    finally:
        peer.close()


async def test_a_frame_that_does_not_decode_fails_the_connection() -> None:
    conn, peer = await connected()
    try:
        peer.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # 0xc1: never valid msgpack
        with pytest.raises(ValueError):
            await asyncio.wait_for(conn.receive(), 5)
    finally:
        peer.close()


async def test_a_peer_that_goes_away_is_channel_closed() -> None:
    conn, peer = await connected()
    peer.sendall(wire.encode(results("last")))
    peer.close()
    # What arrived before the close is still read; then the close is reported.
    assert isinstance(await asyncio.wait_for(conn.receive(), 5), wire.Results)
    with pytest.raises(wire.ChannelClosed):
        await asyncio.wait_for(conn.receive(), 5)
    with pytest.raises(wire.ChannelClosed):
        conn.write(wire.encode(wire.Stop()))
