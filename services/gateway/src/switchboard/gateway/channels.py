"""The gateway's pool of channels to generator replicas: one per address, evicted when idle.

The router names a replica by its address; the gateway keeps one channel per address so that
requests share connections. Replicas come and go (scale-down, rollouts, a crashed pod rescheduled
on a new IP), so the pool must not grow with every address ever seen.

Rule: a channel with no call in flight that has not been leased for `idle_seconds`
(GATEWAY_CHANNEL_IDLE_SECONDS) is closed and dropped. A replica that left the cluster is no longer
a routing candidate, so its channel goes idle and is evicted; a replica still in the cluster that
was merely quiet gets a fresh channel on its next request, which costs one connection setup. This
needs no view of cluster membership (the gateway only sees the router's candidates), and an
in-use channel is never closed: leases are counted, and only a channel with none is evictable.

The sweep runs on every lease (the pool holds one entry per live replica, so it is cheap); a pool
that gets no traffic keeps its idle channels until the next request or `close()`, and gRPC itself
drops their connections after its own idle timeout meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from switchboard.common.channels import open_channel


@dataclass
class _Entry:
    channel: grpc.aio.Channel
    in_use: int = 0
    last_used: float = 0.0


class ChannelPool:
    """Channels per address with leases; idle ones are closed after `idle_seconds`."""

    def __init__(
        self,
        idle_seconds: float,
        open_: Callable[[str], grpc.aio.Channel] = open_channel,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_seconds = idle_seconds
        self._open = open_
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, address: object) -> bool:
        return address in self._entries

    def acquire(self, address: str) -> grpc.aio.Channel:
        """The channel to `address`, leased until `release(address)`; idle channels are swept first.

        Must run on the event loop (it schedules the close of evicted channels).
        """
        now = self._clock()
        self.sweep(now)
        entry = self._entries.get(address)
        if entry is None:
            entry = self._entries[address] = _Entry(self._open(address))
        entry.in_use += 1
        entry.last_used = now
        return entry.channel

    def release(self, address: str) -> None:
        """End one lease of `address`'s channel; its idle time starts now if it was the last."""
        entry = self._entries.get(address)
        if entry is None or entry.in_use == 0:
            raise RuntimeError(f"release of {address} without a lease")
        entry.in_use -= 1
        entry.last_used = self._clock()

    def sweep(self, now: float | None = None) -> list[str]:
        """Close and drop every channel with no lease idle for `idle_seconds`; the addresses dropped."""
        now = self._clock() if now is None else now
        evicted = [
            address
            for address, entry in self._entries.items()
            if entry.in_use == 0 and now - entry.last_used >= self._idle_seconds
        ]
        for address in evicted:
            task = asyncio.get_running_loop().create_task(self._entries.pop(address).channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return evicted

    async def close(self) -> None:
        """Close every channel (on drain), leased or not, and wait for evicted ones to finish closing."""
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            await entry.channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
