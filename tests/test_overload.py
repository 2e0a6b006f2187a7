"""Overload: the real stack offered three times its measured capacity, by a high- and a low-priority tenant.

The stack (scheduler, router, one generator, gateway as processes) admits at most
GATEWAY_MAX_INFLIGHT requests at once and queues GATEWAY_MAX_QUEUED more. The test first measures
the stack's capacity (requests per second with the admission slots kept full), then offers three
times that rate, open loop (arrivals do not wait for answers), for a bounded time: a sixth of it
from the high-priority tenant (half the capacity), the rest from the low-priority one. Every request must end in success or an explicit RESOURCE_EXHAUSTED/UNAVAILABLE (none
hangs, none is lost), the gateway's memory must stay bounded, and the high-priority tenant must
attain its time-to-first-token SLO for more of its requests than the low-priority one (a request
refused or answered late is a miss).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from switchboard.common.channels import open_channel
from switchboard.gateway.tenants import hash_key
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .conftest import RunningStack, start_stack

pytestmark = pytest.mark.slow

MAX_INFLIGHT, MAX_QUEUED = 2, 8
OVERLOAD_SECONDS = 12.0
MAX_TOKENS = 12
DEADLINE_SECONDS = 60.0
HIGH_SHARE = 6
ENDINGS = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}


@dataclass
class Result:
    tenant: str
    code: grpc.StatusCode
    ttft: float | None  # seconds to the first message, when there was one


def rss_kib(stack: RunningStack, name: str) -> int:
    """Resident memory of one of the stack's processes, in KiB (from /proc)."""
    pid = stack.stack.group.processes[name].pid
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {name}")


async def one_request(stub: gateway_pb2_grpc.GatewayStub, tenant: str, key: str) -> Result:
    started = time.monotonic()
    ttft: float | None = None
    call = stub.Generate(
        gateway_pb2.GenerateRequest(
            prompt="Now is the winter of our discontent",
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0),
        ),
        metadata=[("authorization", f"Bearer {key}")],
        timeout=DEADLINE_SECONDS,
    )
    try:
        async for _ in call:
            if ttft is None:
                ttft = time.monotonic() - started
    except grpc.aio.AioRpcError as error:
        return Result(tenant, error.code(), ttft)
    return Result(tenant, grpc.StatusCode.OK, ttft)


async def measure_capacity(stub: gateway_pb2_grpc.GatewayStub, key: str, seconds: float = 6.0) -> float:
    """Requests per second with MAX_INFLIGHT requests always in flight (closed loop, no queueing)."""
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            result = await one_request(stub, "high", key)
            assert result.code == grpc.StatusCode.OK, result
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(MAX_INFLIGHT)))
    return done / (time.monotonic() - started)


async def offer(stub: gateway_pb2_grpc.GatewayStub, rate: float, keys: dict[str, str]) -> list[Result]:
    """Open-loop arrivals at `rate` per second for OVERLOAD_SECONDS, every answer.

    One arrival in HIGH_SHARE is the high-priority tenant's (half the capacity when the rate is three
    times it), the rest the low-priority tenant's: the high tenant alone would fit, the two do not.
    """
    tasks: list[asyncio.Task[Result]] = []
    tenants = ["high"] + ["low"] * (HIGH_SHARE - 1)
    started = time.monotonic()
    index = 0
    while (now := time.monotonic()) - started < OVERLOAD_SECONDS:
        due = started + index / rate
        if due > now:
            await asyncio.sleep(due - now)
        tenant = tenants[index % len(tenants)]
        tasks.append(asyncio.create_task(one_request(stub, tenant, keys[tenant])))
        index += 1
    # Bounded: every request has a deadline, so this cannot wait forever; a hang fails the test here.
    return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=DEADLINE_SECONDS + 30))


def test_three_times_capacity_ends_every_request_and_favours_high_priority(tmp_path: Path, model_dir: Path) -> None:
    running = start_stack(
        tmp_path,
        model_dir,
        {"bard-small": 1},
        env={"GATEWAY_MAX_INFLIGHT": str(MAX_INFLIGHT), "GATEWAY_MAX_QUEUED": str(MAX_QUEUED)},
    )
    try:
        tenants_file = running.stack.plan.tenants_file
        keys = {"high": "sb-overload-high", "low": "sb-overload-low"}
        tenants_file.write_text(
            "tenants:\n"
            + "".join(
                f"  {name}:\n    keys: [{{id: {name}-1, sha256: \"{hash_key(key)}\"}}]\n    priority: {name}\n"
                for name, key in keys.items()
            )
        )

        async def scenario() -> tuple[float, list[Result], int, int]:
            channel = open_channel(running.gateway_addr)
            try:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                capacity = await measure_capacity(stub, keys["high"])
                before = rss_kib(running, "gateway")
                results = await offer(stub, 3 * capacity, keys)
                after = rss_kib(running, "gateway")
                # The stack still serves once the overload is over.
                assert (await one_request(stub, "low", keys["low"])).code == grpc.StatusCode.OK
                return capacity, results, before, after
            finally:
                await channel.close()

        capacity, results, rss_before, rss_after = asyncio.run(scenario())
    finally:
        running.stack.stop()

    codes = Counter((r.tenant, r.code.name) for r in results)
    print(f"capacity {capacity:.2f} req/s; offered {3 * capacity:.2f} req/s for {OVERLOAD_SECONDS:.0f} s: {dict(codes)}")
    print(f"gateway RSS {rss_before} KiB before, {rss_after} KiB after")
    assert len(results) >= 3 * capacity * OVERLOAD_SECONDS * 0.8  # the load was really offered
    assert {r.code for r in results} <= ENDINGS, codes  # no hang (DEADLINE_EXCEEDED), no INTERNAL, none lost
    refused = [r for r in results if r.code != grpc.StatusCode.OK]
    assert refused, "3x capacity was absorbed without a single refusal: the bound is not working"
    # Bounded memory: the queue is bounded, so the overload leaves no lasting growth (a leak of one
    # request's state per refusal would show as many MiB here).
    assert rss_after - rss_before < 64 * 1024
    # The SLO counts every offered request: one refused or answered later than the SLO is a miss (so
    # shedding never looks good). The SLO is four times the mean latency at capacity.
    slo = 4 * MAX_INFLIGHT / capacity
    attained = {
        t: sum(1 for r in results if r.tenant == t and r.code == grpc.StatusCode.OK and r.ttft is not None and r.ttft <= slo)
        / max(1, sum(1 for r in results if r.tenant == t))
        for t in ("high", "low")
    }
    print(f"TTFT SLO {slo:.2f} s attained: high {attained['high']:.0%}, low {attained['low']:.0%}")
    assert attained["high"] > attained["low"]
