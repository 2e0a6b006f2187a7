"""Open-loop replay: send each request at its arrival time, whatever the server is doing.

Bounds: each request has a timeout (the call is cancelled and the request recorded as
`timeout`); the whole run has a deadline (default: last arrival + timeout + 30 s), after
which requests still in flight are cancelled and recorded as `aborted` and requests not yet
sent as `not_sent`. So a run always ends, and every request of the workload ends with a
status: ok, timeout, a failure status, aborted or not_sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from switchboard.bench.records import STATUS_PENDING, STATUS_TIMEOUT, RequestRecord
from switchboard.bench.targets import Target
from switchboard.bench.workload import TraceRequest

STATUS_ABORTED = "aborted"
STATUS_NOT_SENT = "not_sent"
STATUS_CLIENT_ERROR = "client_error"
DEFAULT_DEADLINE_GRACE_S = 30.0


async def replay(
    target: Target,
    requests: Sequence[TraceRequest],
    prompts: Sequence[str],
    timeout_s: float,
    max_concurrency: int | None = None,
    run_deadline_s: float | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
    warmup_requests: int = 0,
    stop: asyncio.Event | None = None,
) -> list[RequestRecord]:
    """Replay `requests` (with their `prompts`) against `target`; one record per request.

    `warmup_requests` requests (the first prompts, 4 output tokens each) are sent one after
    another before the clock starts and are not recorded: servers that load or compile on
    their first request would otherwise charge that to the replay. Setting `stop` (e.g. on
    Ctrl-C) ends the run like its deadline: in-flight requests aborted, the rest not sent,
    and the records returned.
    """
    if len(prompts) != len(requests):
        raise ValueError("one prompt per request")
    if timeout_s <= 0:
        raise ValueError("timeout must be > 0")
    records = [RequestRecord(r.index, r.arrival_s, r.input_tokens, r.output_tokens) for r in requests]
    if run_deadline_s is None:
        last = max((r.arrival_s for r in requests), default=0.0)
        run_deadline_s = last + timeout_s + DEFAULT_DEADLINE_GRACE_S
    limiter = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    await target.start()
    try:
        await _warm_up(target, requests, prompts, warmup_requests, timeout_s)
    except BaseException:
        await target.close()
        raise
    clock_zero = time.perf_counter()
    target.clock_zero = clock_zero

    async def one(request: TraceRequest, prompt: str, record: RequestRecord) -> None:
        try:
            if limiter is not None:
                async with limiter:
                    await _send_with_timeout(target, prompt, request, record, timeout_s, clock_zero)
            else:
                await _send_with_timeout(target, prompt, request, record, timeout_s, clock_zero)
        except asyncio.CancelledError:
            if record.sent_s is not None:
                record.finish(clock_zero, STATUS_ABORTED, "run ended (deadline passed or stopped)")
            raise
        finally:
            if on_done is not None and record.status != STATUS_PENDING:
                on_done(record)

    tasks: list[asyncio.Task[None]] = []

    async def dispatch() -> None:
        for request, prompt, record in zip(requests, prompts, records, strict=True):
            delay = request.arrival_s - (time.perf_counter() - clock_zero)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request, prompt, record)))
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        dispatcher = asyncio.create_task(dispatch())
        waiters: set[asyncio.Task] = {dispatcher}
        if stop is not None:
            waiters.add(asyncio.create_task(stop.wait()))
        done, pending = await asyncio.wait(waiters, timeout=run_deadline_s, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        if dispatcher not in done:  # deadline passed or stop was set: end the run now
            for task in tasks:
                task.cancel()
        await asyncio.gather(*pending, *tasks, return_exceptions=True)
    finally:
        await target.close()
    for record in records:
        if record.status == STATUS_PENDING:
            record.status = STATUS_NOT_SENT if record.sent_s is None else STATUS_ABORTED
            if on_done is not None:
                on_done(record)
    return records


async def _warm_up(target: Target, requests: Sequence[TraceRequest], prompts: Sequence[str], count: int,
                   timeout_s: float) -> None:
    """Send `count` short unrecorded requests, one at a time (failures are ignored here: the replay records them)."""
    for i in range(min(count, len(requests))):
        scratch = RequestRecord(-1, 0.0, requests[i].input_tokens, 4)
        target.clock_zero = time.perf_counter()
        warmup = replace(requests[i], index=-(i + 1), output_tokens=4)
        await _send_with_timeout(target, prompts[i], warmup, scratch, timeout_s, target.clock_zero)


async def _send_with_timeout(target: Target, prompt: str, request: TraceRequest, record: RequestRecord,
                             timeout_s: float, clock_zero: float) -> None:
    """Run one request under its timeout; a timeout or a client bug becomes the record's status."""
    record.mark_sent(clock_zero)  # the target marks it again just before its call goes out
    try:
        async with asyncio.timeout(timeout_s):
            await target.send(prompt, request, record)
    except TimeoutError:
        record.finish(clock_zero, STATUS_TIMEOUT, f"no complete answer within {timeout_s:g} s; cancelled")
    except Exception as exc:  # a target bug must not lose the request or stop the run
        record.finish(clock_zero, STATUS_CLIENT_ERROR, f"{type(exc).__name__}: {exc}")
    if record.status == STATUS_PENDING:
        record.finish(clock_zero, STATUS_CLIENT_ERROR, "target returned without a status")
