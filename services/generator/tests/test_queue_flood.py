"""A flood far beyond GENERATOR_MAX_WAITING at a real in-process generator, over real channels.

One long request holds the only running slot (GENERATOR_MAX_NUM_SEQS=1), so the waiting queue
fills to its bound and stays full while a flood of concurrent Generate calls arrives. Every call
has a deadline and the test counts how each one ended: exactly the bound's worth were queued (and
finish once the long request is cancelled), every other call is refused at once with
RESOURCE_EXHAUSTED, RetryInfo and reason REPLICA_QUEUE_FULL; none hangs, none ends otherwise.
The flood is repeated, and the process's resident set may not grow with the number of floods
beyond a generous bound; the engine is empty again after each (no waiting or running sequence, no KV block held).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import build_llama
from service_fixtures import generator_settings, running_generator
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.generator.app import GeneratorApp
from switchboard.generator.loader import LoadedModel, load_model
from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc

PROMPT = "To be, or not to be, that is the question."
LONG_CONTEXT = 8192
MAX_WAITING = 4
FLOOD = 128  # concurrent calls per flood: 32 times the queue bound
FLOODS = 5
DEADLINE_S = 120.0  # every call's deadline: generous on a slow shared machine, but never unbounded
# Resident-set growth allowed from the first flood to the last (496 refusals later): generous for
# allocator noise, far below what keeping each refused call (its request, span, context, the
# call's transport buffers) would cost. tracemalloc would be finer, but its overhead on every
# allocation starves the server loop on a small machine (calls then wait past gRPC's 30 s
# unrequested-call limit and end CANCELLED), so the test would measure the tracer, not the service.
RSS_GROWTH_BYTES = 32 * 1024 * 1024


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny random Llama with a long context, so one request can hold the running slot."""
    folder = build_llama(tmp_path_factory.mktemp("flood") / "tiny-llama", max_positions=LONG_CONTEXT)
    return load_model(folder, "cpu", "float32")


@pytest.fixture
async def app(loaded: LoadedModel) -> AsyncIterator[GeneratorApp]:
    """The replica under test. Its engine runs with one torch thread for the test: on a small
    machine torch's intra-op threads keep every core busy while the long request decodes and the
    server's loop then takes calls so slowly that queued ones pass gRPC's unrequested-call limit."""
    settings = generator_settings(str(loaded.path), max_num_seqs=1, max_waiting=MAX_WAITING)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        async with running_generator(loaded, settings) as running:
            yield running
    finally:
        torch.set_num_threads(threads)


def rss_bytes() -> int:
    """The resident set of this process now (Linux /proc), not its peak."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def outcome(stub: generator_pb2_grpc.GeneratorStub) -> tuple[grpc.StatusCode, dict[str, object] | None]:
    """How one short Generate ended: its status code, and the error's details when it failed."""
    request = generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0))
    try:
        async for _ in stub.Generate(request, timeout=DEADLINE_S):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code(), error_details(error)
    return grpc.StatusCode.OK, None


async def read_all(call: object) -> None:
    """Read a stream to its end; a cancelled one ends quietly."""
    try:
        # read(), as the caller already did: grpc.aio does not let one call mix read() and iteration.
        while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
            pass
    except asyncio.CancelledError:
        pass


async def flood(app: GeneratorApp, stub: generator_pb2_grpc.GeneratorStub) -> Counter[str]:
    """One flood behind a long request; returns the count of each way the calls ended."""
    long_request = generator_pb2.GeneratorGenerateRequest(
        prompt=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=LONG_CONTEXT - 64, temperature=0.0, ignore_eos=True)
    )
    blocker = stub.Generate(long_request, timeout=DEADLINE_S)
    await blocker.read()  # it is running: the only slot is taken
    reader = asyncio.create_task(read_all(blocker))  # keep its stream read, as a real client does
    refused_enough = asyncio.Event()
    ended: list[tuple[grpc.StatusCode, dict[str, object] | None]] = []

    async def call() -> None:
        ended.append(await outcome(stub))
        if len(ended) >= FLOOD - MAX_WAITING:
            refused_enough.set()

    tasks = [asyncio.create_task(call()) for _ in range(FLOOD)]
    # All but the queued ones end without the engine; the deadlines bound this wait.
    await asyncio.wait_for(refused_enough.wait(), DEADLINE_S + 10)
    assert not reader.done(), "the long request ended before the flood was answered"
    assert app.engine.load().waiting == MAX_WAITING and app.engine.load().running == 1
    blocker.cancel()
    await asyncio.gather(*tasks, reader)
    counts: Counter[str] = Counter()
    for code, details in ended:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert details is not None and details["reason"] == "REPLICA_QUEUE_FULL", details
            retry_after = details["retry_after"]
            assert isinstance(retry_after, float) and retry_after > 0, details
            assert f"bound {MAX_WAITING}" in str(details["message"])
        counts[code.name] += 1
    return counts


async def test_a_flood_beyond_the_queue_bound_is_refused_with_bounded_memory(app: GeneratorApp) -> None:
    channel = open_channel(f"127.0.0.1:{app.service.port}")
    try:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        rss: list[int] = []
        for _ in range(FLOODS):
            counts = await flood(app, stub)
            assert counts == Counter({"RESOURCE_EXHAUSTED": FLOOD - MAX_WAITING, "OK": MAX_WAITING}), counts
            # The engine lets everything go: no sequence left, every KV block back in the pool.
            load = app.engine.load()
            assert (load.waiting, load.running, load.kv_blocks_used) == (0, 0, 0), load
            gc.collect()
            rss.append(rss_bytes())
        # The first flood warms caches (gRPC, protobuf, metrics label sets); growth is measured after it.
        assert rss[-1] - rss[0] <= RSS_GROWTH_BYTES, rss
        # The replica still serves normally afterwards.
        assert (await outcome(stub))[0] == grpc.StatusCode.OK
    finally:
        await channel.close()
