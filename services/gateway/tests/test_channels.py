"""The replica channel pool: idle channels are closed and dropped, a leased one never is.

The clock is a fake one the tests advance; the channels are real, to a real in-process server,
so "closed" and "a stream survives a sweep" are observed on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from switchboard.common.channels import open_channel
from switchboard.gateway.channels import ChannelPool

SERVICE = "switchboard.test.Slow"
IDLE = 10.0


async def slow_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(3):
        yield bytes([i])
        await asyncio.sleep(0.05)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    handlers = {"Stream": grpc.unary_stream_rpc_method_handler(slow_stream)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recording:
    """open_channel that remembers every channel it opened."""

    def __init__(self) -> None:
        self.opened: list[grpc.aio.Channel] = []

    def __call__(self, address: str) -> grpc.aio.Channel:
        channel = open_channel(address)
        self.opened.append(channel)
        return channel


async def is_closed(channel: grpc.aio.Channel) -> bool:
    """Whether `channel` (to the live test server) refuses a new call: a closed channel does."""
    try:
        return await channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=5).read() != b"\x00"
    except Exception:
        return True


async def test_one_channel_per_address_is_reused(address: str) -> None:
    opened = Recording()
    pool = ChannelPool(IDLE, opened, Clock())
    first = pool.acquire(address)
    pool.release(address)
    assert pool.acquire(address) is first
    pool.release(address)
    assert len(opened.opened) == 1
    await pool.close()
    assert await is_closed(first)


async def test_idle_channel_is_closed_and_evicted(address: str) -> None:
    clock, opened = Clock(), Recording()
    pool = ChannelPool(IDLE, opened, clock)
    other = "127.0.0.1:1"  # leased only to trigger sweeps; no call is made on it
    pool.acquire(address)  # `address` then leaves the cluster: never leased again
    pool.release(address)
    gone = opened.opened[0]
    assert not await is_closed(gone)
    clock.now += IDLE - 1
    pool.acquire(other)  # sweeps: not idle long enough yet
    pool.release(other)
    assert address in pool
    clock.now += 1
    pool.acquire(other)  # sweeps: `address` has now been idle IDLE seconds; `other` was used 1 s ago
    pool.release(other)
    assert address not in pool and other in pool
    await asyncio.sleep(0.1)  # the close runs as a task
    assert await is_closed(gone)
    # A later request to an evicted address opens a fresh, working channel.
    fresh = pool.acquire(address)
    assert fresh is not gone and fresh is opened.opened[-1]
    assert not await is_closed(fresh)
    pool.release(address)
    clock.now += IDLE
    assert sorted(pool.sweep()) == sorted([address, other]) and len(pool) == 0
    await pool.close()
    assert await is_closed(fresh)


async def test_leased_channel_is_never_closed_under_a_stream(address: str) -> None:
    clock = Clock()
    pool = ChannelPool(IDLE, clock=clock)
    channel = pool.acquire(address)
    call = channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=10)
    assert await call.read() == b"\x00"
    clock.now += IDLE * 100  # long past idle, but leased
    assert pool.sweep() == []
    assert pool.acquire("127.0.0.1:1") is not channel  # a sweep on another lease spares it too
    pool.release("127.0.0.1:1")
    rest = []  # read() to the end: grpc.aio does not let one call mix read() and iteration
    while (item := await call.read()) is not grpc.aio.EOF:
        rest.append(item)
    assert rest == [b"\x01", b"\x02"] and not await is_closed(channel)
    pool.release(address)
    clock.now += IDLE - 0.5  # idle time counts from the release, not the acquire
    assert address not in pool.sweep()
    clock.now += 0.5
    assert address in pool.sweep()
    await pool.close()
    assert await is_closed(channel)


async def test_release_without_lease_is_an_error() -> None:
    pool = ChannelPool(IDLE, clock=Clock())
    with pytest.raises(RuntimeError):
        pool.release("127.0.0.1:1")
