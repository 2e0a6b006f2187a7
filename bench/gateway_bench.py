"""Gateway benchmark: the latency the gateway, router and scheduler add to a request, and the
requests/s one gateway process sustains.

(1) **added latency** (the real local stack: `switchboard up --no-gate --free-ports` with one demo
    expert, `bard-small` by default, one generator replica). One client process, grpc.aio, one reused
    channel per target, one request at a time, the targets interleaved call by call (order rotating):
      - peer:      `Generator.Generate` straight to the generator's port (no auth, no routing);
      - pinned:    `Gateway.Generate` with a valid key and `model=<expert>` (gateway -> router ->
                   scheduler -> generator);
      - auto:      the same, unpinned (the router's n-gram rule picks the expert; --no-gate);
      - hop:       the gateway's grpc.health.v1 Check (one bare Python gRPC round trip, no auth).
    Each request is a short fixed prompt with `max_tokens=1`, greedy; the time is to the end of the
    stream. "added" = gateway quantile - peer quantile (p50 and p99); ratio = gateway / peer.
(2) **gateway throughput**: scheduler, router and gateway as processes (as `switchboard up` runs
    them: real tenants file with limits that every request goes through but never hits, in-process
    limits store, admission, tracing on without an exporter, JSON logs to a file), in front of two
    *instant stand-in* replicas (`InstantGenerator`, this file: one process, two ports, registered
    with the scheduler like a generator; each answers one token at once, so the model costs nothing and
    the gateway path is what is measured). C closed-loop clients (one process, one channel) for a
    fixed duration each, over gRPC `Gateway.Generate` and over the HTTP front's streamed
    `/v1/completions` (httpx, SSE to `[DONE]`). Also the CPU seconds each process used in the
    window (from /proc), so the gateway's CPU per request and whether it was saturated are visible.
(3) **profile** (with `--profile`, default on when py-spy is installed): py-spy (`record --nonblocking
    --format raw`) attached to the gateway and the router during an extra gRPC throughput window
    (not counted in (2)); prints the top functions by inclusive and by own samples, restricted to
    Switchboard's code and the libraries it calls.

Run:  .venv/bin/python bench/gateway_bench.py [--requests 300] [--concurrency 32,64] [--duration 10]
          [--expert bard-small] [--no-http] [--no-profile] [--json OUT]        # about 2.5 minutes on 2 cores
py-spy is optional (`.venv/bin/pip install py-spy`; not a project requirement).
Targets (the issue): added latency <= 2 ms at p50 and <= 5 ms at p99. The script prints them; nothing
asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from bench_common import ROOT, machine, quantiles_ms, switchboard_up

PROMPT = "To be, or not to be, that is the question:"
TARGET_ADDED_MS = {"p50": 2.0, "p99": 5.0}
BENCH_TENANT = "bench"
# Limits that every request passes through (each bucket, the stream lease and the budget are
# checked and charged) but that the bench never reaches.
BENCH_LIMITS = {
    "requests_per_second": 1_000_000,
    "request_burst": 1_000_000,
    "tokens_per_second": 100_000_000,
    "token_burst": 100_000_000,
    "max_concurrent_streams": 100_000,
    "max_output_tokens": 4096,
    "monthly_token_budget": 1_000_000_000_000,
}
STANDIN_REPLICAS = 2
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- shared helpers -------------------------------------------------------------------------------


def write_tenants(path: Path) -> str:
    """A tenants file with one `bench` tenant (every expert, high limits); returns its API key."""
    import yaml
    from switchboard.gateway.keys import new_key
    from switchboard.gateway.tenants import hash_key

    key = new_key()
    document = {
        "tenants": {
            BENCH_TENANT: {
                "keys": [{"id": "bench-1", "sha256": hash_key(key)}],
                "scopes": ["experts:*"],
                "priority": "normal",
                "limits": BENCH_LIMITS,
            }
        }
    }
    path.write_text(yaml.safe_dump(document))
    return key


def one_expert_config(folder: Path, expert: str, model: Path) -> Path:
    """An experts config with only `expert` (its model a folder, so nothing is built)."""
    config = folder / "experts.yaml"
    config.write_text(
        "experts:\n"
        f"  - name: {expert}\n"
        f"    description: the {expert} demo expert, alone, for the gateway benchmark\n"
        f"    model: {model}\n"
        "    relative_cost: 1.0\n"
        "    replicas: 1\n"
    )
    return config


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def fmt(stats: dict[str, float], keys: Sequence[str] = ("p50", "p90", "p99")) -> str:
    return " / ".join(f"{stats[k]:.2f}" for k in keys)


def sampling() -> Any:
    from switchboard.v1 import common_pb2

    return common_pb2.SamplingParams(max_tokens=1, temperature=0.0)


# --- (1) added latency on the real stack ----------------------------------------------------------


async def latency_rounds(
    gateway_addr: str, generator_addr: str, key: str, expert: str, requests: int, warmup: int, pki: Path
) -> dict[str, list[float]]:
    """Interleaved peer / pinned / auto / hop round trips, one at a time; seconds each."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from switchboard.v1 import gateway_pb2, gateway_pb2_grpc, generator_pb2, generator_pb2_grpc

    clock = time.perf_counter
    metadata = (("authorization", f"Bearer {key}"),)
    gw_channel = grpc.aio.insecure_channel(gateway_addr)
    # `switchboard up` runs the internal hops with mutual TLS: the peer call uses the stack's operator
    # identity (its throwaway CA), as the gateway's own call to the generator uses the gateway's.
    from switchboard.common.channels import open_channel
    from switchboard.common.tls import TlsIdentity

    operator = TlsIdentity(pki / "ca.pem", pki / "operator.pem", pki / "operator-key.pem")
    gen_channel = open_channel(generator_addr, operator if operator.cert_file.is_file() else None, peer_role="generator")
    gateway = gateway_pb2_grpc.GatewayStub(gw_channel)
    generator = generator_pb2_grpc.GeneratorStub(gen_channel)
    health = health_pb2_grpc.HealthStub(gw_channel)
    params = sampling()

    async def peer(i: int) -> float:
        request = generator_pb2.GeneratorGenerateRequest(request_id=f"peer-{i}-{uuid.uuid4().hex[:8]}",
                                                         prompt=PROMPT, sampling=params)
        t = clock()
        tokens = 0
        async for chunk in generator.Generate(request, timeout=30):
            tokens += len(chunk.token_ids)
        seconds = clock() - t
        assert tokens == 1, tokens
        return seconds

    async def through(i: int, model: str) -> float:
        request = gateway_pb2.GenerateRequest(prompt=PROMPT, sampling=params, model=model,
                                              request_id=f"gw-{i}-{uuid.uuid4().hex[:8]}")
        t = clock()
        tokens = 0
        async for chunk in gateway.Generate(request, metadata=metadata, timeout=30):
            tokens += chunk.token_count
        seconds = clock() - t
        assert tokens == 1, tokens
        return seconds

    async def pinned(i: int) -> float:
        return await through(i, expert)

    async def auto(i: int) -> float:
        return await through(i, "")

    async def hop(i: int) -> float:
        t = clock()
        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return clock() - t

    sides = [peer, pinned, auto, hop]
    samples: dict[str, list[float]] = {f.__name__: [] for f in sides}
    try:
        for i in range(warmup):
            for f in sides:
                await f(i)
        for i in range(requests):
            shift = i % len(sides)
            for f in sides[shift:] + sides[:shift]:
                samples[f.__name__].append(await f(i))
    finally:
        await gw_channel.close()
        await gen_channel.close()
    return samples


def generator_address(log: Path) -> str:
    """The (first) generator's host:port from `switchboard up`'s banner."""
    for line in log.read_text().splitlines():
        if line.strip().startswith("generator "):
            return line.split()[1]
    raise RuntimeError(f"no generator line in {log}")


def added_latency(args: argparse.Namespace, model: Path, work: Path, key: str, tenants: Path) -> dict[str, Any]:
    config = one_expert_config(work, args.expert, model)
    log = work / "up.log"
    # A cache folder of its own (dev key, logs): nothing of a developer's stack is touched.
    env = {"SWITCHBOARD_CACHE_DIR": str(work / "cache"), "GATEWAY_TENANTS_FILE": str(tenants)}
    started = time.monotonic()
    with switchboard_up(config, log, args=["--no-gate", "--free-ports"], env=env, ready_timeout_s=300) as gateway:
        up_s = time.monotonic() - started
        generator = generator_address(log)
        print(f"    stack up in {up_s:.1f} s: gateway {gateway}, generator {generator} ({args.expert})", flush=True)
        samples = asyncio.run(
            latency_rounds(gateway, generator, key, args.expert, args.requests, args.warmup, work / "cache" / "pki")
        )
    stats = {name: quantiles_ms(s) for name, s in samples.items()}
    out: dict[str, Any] = {"expert": args.expert, "model": str(model), "requests": args.requests,
                           "warmup": args.warmup, "prompt": PROMPT, "max_tokens": 1, **stats}
    for side in ("pinned", "auto"):
        out[f"added_{side}"] = {k: stats[side][k] - stats["peer"][k] for k in ("p50", "p90", "p99")}
        out[f"ratio_{side}"] = {k: stats[side][k] / stats["peer"][k] for k in ("p50", "p90", "p99")}
    return out


# --- (2) throughput: real gateway, router, scheduler; instant stand-in replicas ---------------------


class InstantGenerator:
    """An instant stand-in for a generator replica: answers every Generate with one token at once.

    Not a model: it exists so that the throughput run measures the gateway (and the router and
    scheduler it calls), not generation. Registered with the scheduler like a generator (Register,
    then ReportLoad heartbeats), announcing the expert's real tokenizer fingerprint so the router
    sends token ids as it would to a real replica.
    """

    def __init__(self) -> None:
        self.served = 0
        self.with_ids = 0

    def servicer(self) -> Any:
        from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc

        outer = self

        class Servicer(generator_pb2_grpc.GeneratorServicer):
            async def Generate(self, request: Any, context: Any) -> Any:
                outer.served += 1
                outer.with_ids += bool(request.prompt_token_ids)
                prompt_tokens = len(request.prompt_token_ids) or max(1, len(request.prompt) // 4)
                yield generator_pb2.GeneratorGenerateResponse(
                    text=" x", token_ids=[7], finish_reason=common_pb2.FINISH_REASON_LENGTH,
                    usage=common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=1),
                )

        return Servicer()


async def serve_instant(scheduler_addr: str, expert: str, fingerprint: str, ports: Sequence[int]) -> None:
    """Run the stand-in replicas on `ports` until SIGTERM; register and heartbeat each."""
    import signal

    from switchboard.v1 import generator_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

    standin = InstantGenerator()
    servers = []
    for port in ports:
        server = grpc.aio.server()
        generator_pb2_grpc.add_GeneratorServicer_to_server(standin.servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        servers.append(server)
    channel = grpc.aio.insecure_channel(scheduler_addr)
    scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
    load = scheduler_pb2.ReplicaLoad(kv_blocks_total=4096)
    ids = [f"{expert}-instant-{i}" for i in range(len(ports))]
    interval = 1.0
    for replica_id, port in zip(ids, ports, strict=True):
        reply = await scheduler.Register(scheduler_pb2.RegisterRequest(
            replica_id=replica_id, expert=expert, address=f"127.0.0.1:{port}", device="cpu", model_name=expert,
            max_model_len=512, kv_block_size=16, tokenizer_fingerprint=fingerprint, max_waiting=100_000, load=load,
        ), timeout=5)
        interval = reply.heartbeat_interval_seconds or interval
    print(json.dumps({"standin": "ready", "replicas": ids}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        for replica_id in ids:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await scheduler.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id=replica_id, load=load), timeout=2)
    print(json.dumps({"standin": "stopped", "served": standin.served, "with_token_ids": standin.with_ids}), flush=True)
    await channel.close()
    for server in servers:
        await server.stop(0.5)


@contextlib.contextmanager
def throughput_stack(model: Path, expert: str, work: Path, tenants: Path) -> Iterator[dict[str, Any]]:
    """Scheduler, router, gateway (processes, as `switchboard up` starts them) and the stand-ins."""
    from switchboard.cli.localstack import plan_stack, service_specs
    from switchboard.cli.processes import ProcessGroup, free_port
    from switchboard.common.tokenizer_fingerprint import fingerprint_file

    config = one_expert_config(work, expert, model)
    plan = plan_stack(config, tenants, free_ports=True, metrics=False)
    plan.generators.clear()  # the stand-ins take their place
    specs = service_specs(plan)
    logs = work / "tput-logs"
    group = ProcessGroup(logs, grace=5.0)
    standin: subprocess.Popen[bytes] | None = None
    try:
        group.start(specs["scheduler"])
        group.wait_healthy(["scheduler"], timeout=60)
        group.start(specs["router"])
        group.start(specs["gateway"])
        group.wait_healthy(timeout=120)
        ports = [free_port() for _ in range(STANDIN_REPLICAS)]
        logs.mkdir(parents=True, exist_ok=True)
        standin_log = logs / "standin.log"
        with standin_log.open("wb") as out:
            standin = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve-instant", plan.scheduler_addr,
                 "--expert", expert, "--fingerprint", fingerprint_file(model), "--ports", ",".join(map(str, ports))],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )
        deadline = time.monotonic() + 30
        while '"ready"' not in standin_log.read_text():
            if standin.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stand-in replicas did not start:\n{standin_log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield {
            "gateway": plan.gateway_addr, "http": f"http://127.0.0.1:{plan.gateway_http_port}",
            "pids": {name: p.pid for name, p in group.processes.items()} | {"standin": standin.pid, "client": os.getpid()},
            "logs": logs, "standin_log": standin_log,
        }
    finally:
        if standin is not None and standin.poll() is None:
            standin.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                standin.wait(10)
            if standin.poll() is None:
                standin.kill()
        group.stop_all()


async def closed_loop(
    call: Any, concurrency: int, duration: float, warmup: float, pids: dict[str, int]
) -> dict[str, Any]:
    """`concurrency` workers calling `call()` back to back; only calls that start and end inside the
    measured window [warmup, warmup + duration) count. CPU seconds of every process over the window."""
    clock = time.perf_counter
    begin = clock()
    window = (begin + warmup, begin + warmup + duration)
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    cpu: dict[str, float] = {}

    async def worker() -> None:
        while True:
            t = clock()
            if t >= window[1]:
                return
            try:
                await call()
            except Exception as exc:
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                errors[code] += 1
                continue
            end = clock()
            if t >= window[0] and end < window[1]:
                latencies.append(end - t)

    async def meter() -> None:
        await asyncio.sleep(max(0.0, window[0] - clock()))
        before = {n: cpu_seconds(p) for n, p in pids.items()}
        await asyncio.sleep(max(0.0, window[1] - clock()))
        cpu.update({n: cpu_seconds(p) - before[n] for n, p in pids.items()})

    await asyncio.gather(meter(), *(worker() for _ in range(concurrency)))
    done = len(latencies)
    return {
        "concurrency": concurrency, "duration_s": duration, "completed": done, "requests_per_s": done / duration,
        "errors": dict(errors), "latency_ms": quantiles_ms(latencies) if latencies else None,
        "cpu_s": cpu, "cpu_share_of_one_core": {n: s / duration for n, s in cpu.items()},
        "gateway_cpu_ms_per_request": 1000 * cpu.get("gateway", 0.0) / done if done else None,
        # What the gateway alone would sustain with a core to itself (its CPU per request, one thread).
        "gateway_cpu_bound_requests_per_s": done / cpu["gateway"] if done and cpu.get("gateway") else None,
    }


async def grpc_throughput(addr: str, key: str, expert: str, concurrency: int, duration: float, warmup: float,
                          pids: dict[str, int]) -> dict[str, Any]:
    from switchboard.v1 import gateway_pb2, gateway_pb2_grpc

    channel = grpc.aio.insecure_channel(addr)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    metadata = (("authorization", f"Bearer {key}"),)
    request = gateway_pb2.GenerateRequest(prompt=PROMPT, sampling=sampling(), model=expert)

    async def call() -> None:
        async for _ in stub.Generate(request, metadata=metadata, timeout=30):
            pass

    try:
        return await closed_loop(call, concurrency, duration, warmup, pids)
    finally:
        await channel.close()


async def http_throughput(base: str, key: str, expert: str, concurrency: int, duration: float, warmup: float,
                          pids: dict[str, int]) -> dict[str, Any]:
    import httpx

    body = {"model": expert, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "stream": True}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=30) as client:

        async def call() -> None:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        return
            raise RuntimeError("stream ended without [DONE]")

        return await closed_loop(call, concurrency, duration, warmup, pids)


# --- (3) profile ------------------------------------------------------------------------------------


def pyspy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).is_file() else None


def start_pyspy(pid: int, out: Path, seconds: float, rate: int) -> subprocess.Popen[bytes]:
    """py-spy on a running process: only samples holding the GIL (Python CPU time), full paths."""
    return subprocess.Popen(
        [pyspy() or "py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
         "--nonblocking", "--gil", "--full-filenames", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


# What a sample's time is spent on: the innermost frame whose file matches, searched from the top of
# the stack down (first match wins, so a protobuf constructor called from core.py counts as protobuf).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("logging (structlog, JSON lines, redaction)", ("/structlog/", "/logging/", "/json/", "common/logging.py",
                                                    "common/redaction.py")),
    ("tracing (OpenTelemetry spans, context, propagation)", ("/opentelemetry/", "common/telemetry.py")),
    ("metrics (prometheus_client)", ("/prometheus_client/",)),
    ("protobuf (messages, copies)", ("/google/protobuf/",)),
    ("auth (interceptor, keys, tenants file check)", ("gateway/auth", "gateway/tenants.py", "gateway/jwt_tokens.py",
                                                      "gateway/principal.py")),
    ("limits (limiter, in-process store)", ("gateway/limiter.py", "gateway/limitstore.py")),
    ("admission controller", ("gateway/admission.py",)),
    ("channel pool", ("gateway/channels.py",)),
    ("metering", ("gateway/metering.py",)),
    ("validation", ("gateway/validation.py",)),
    ("gateway core / servicer (own lines)", ("gateway/core.py", "gateway/servicer.py")),
    ("HTTP front (starlette/uvicorn/h11)", ("gateway/http_", "/starlette/", "/uvicorn/", "/h11/", "/httptools/")),
    ("shared interceptors (metrics, decode, errors; own lines)", ("common/interceptors.py", "common/errors.py")),
    ("router (own code)", ("/switchboard/router/", "/switchboard/routing/")),
    ("scheduler client / common", ("/switchboard/common/",)),
    ("grpc Python layer (aio calls, channel, server plumbing)", ("/grpc/",)),
    ("asyncio loop + grpc's Cython aio core (native frames, run from Handle._run)", ("/asyncio/", "selectors.py")),
    ("uuid", ("uuid.py",)),
    ("typing / abc isinstance checks", ("typing.py", "<frozen abc>")),
]


def _frame(frame: str) -> tuple[str, str, str]:
    """(function, path, line) of a py-spy frame `function (path:line)`."""
    name, _, where = frame.rpartition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return name, path, line


def _short(path: str) -> str:
    for marker in ("/src/switchboard/", "site-packages/", "/lib/python3.11/", "/lib/python3.12/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarize_profile(raw: Path, top: int = 20) -> dict[str, Any]:
    """Shares of the GIL-holding samples: by category (innermost matching frame), by Switchboard call
    site (the innermost frame in Switchboard's code, file:line, everything it calls included) and by
    Switchboard function (inclusive)."""
    by_category: collections.Counter[str] = collections.Counter()
    by_site: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f and " (" in f]
        if not frames:
            continue
        total += n
        category = "other"
        for _, path, _ in reversed(frames):
            hit = next((label for label, needles in CATEGORIES if any(x in path for x in needles)), None)
            if hit is not None:
                category = hit
                break
        by_category[category] += n
        name, path, ln = frames[-1]
        own[f"{name} ({_short(path)}:{ln})"] += n
        ours = [(name, path, ln) for name, path, ln in frames
                if "/switchboard/" in path and not path.endswith(("common/service.py", "__main__.py"))]
        if ours:
            name, path, ln = ours[-1]
            by_site[f"{_short(path)}:{ln} {name}"] += n
        else:
            by_site["(no Switchboard frame: event loop, grpc callbacks, background threads)"] += n
        for name in {f"{name} ({_short(path)})" for name, path, _ in ours}:
            inclusive[name] += n

    def share(counter: collections.Counter[str], k: int) -> list[tuple[str, float]]:
        return [(key, round(100 * v / total, 1)) for key, v in counter.most_common(k)] if total else []

    return {"samples": total, "categories_pct": share(by_category, 30), "call_sites_pct": share(by_site, top),
            "functions_inclusive_pct": share(inclusive, top), "own_lines_pct": share(own, top)}


# --- main -------------------------------------------------------------------------------------------


def print_latency(r: dict[str, Any]) -> None:
    print(f"\n(1) added latency, {r['requests']} requests per target after {r['warmup']} warm-up rounds, "
          f"interleaved, one at a time, max_tokens=1, ms p50 / p90 / p99 (time to the end of the stream)")
    print("| target | p50 / p90 / p99 | added vs peer p50 / p99 | ratio (gateway / peer) p50 / p99 |")
    print("|---|---:|---:|---:|")
    print(f"| peer: Generator.Generate straight to the generator | {fmt(r['peer'])} | | |")
    for side, label in (("pinned", f"Gateway.Generate, model={r['expert']}"), ("auto", "Gateway.Generate, unpinned")):
        a, q = r[f"added_{side}"], r[f"ratio_{side}"]
        met = all(a[k] <= TARGET_ADDED_MS[k] for k in TARGET_ADDED_MS)
        print(f"| {label} | {fmt(r[side])} | **{a['p50']:.2f} / {a['p99']:.2f}** ({'met' if met else 'MISSED'}) | "
              f"{q['p50']:.2f}x / {q['p99']:.2f}x |")
    print(f"| bare hop: gateway's health Check (no auth) | {fmt(r['hop'])} | | |")
    print(f"    target: added <= {TARGET_ADDED_MS['p50']:g} ms p50 and <= {TARGET_ADDED_MS['p99']:g} ms p99")
    print("    added p99 = gateway p99 - peer p99 (each side's own tail; the two tails need not be the same requests)")


def print_throughput(rows: list[dict[str, Any]]) -> None:
    print("\n(2) one gateway process in front of INSTANT STAND-IN replicas (not a model; one token at once), "
          "real router + scheduler, closed-loop clients")
    print("| front | clients | requests/s | latency p50 / p90 / p99 ms | errors | CPU, share of one core: "
          "gateway / router / scheduler / stand-in / client | gateway CPU ms per request | gateway CPU-bound req/s |")
    print("|---|---:|---:|---:|---|---|---:|---:|")
    for r in rows:
        c = r["cpu_share_of_one_core"]
        c = {n: c.get(n, 0.0) for n in ("gateway", "router", "scheduler", "standin", "client")}
        lat = fmt(r["latency_ms"]) if r["latency_ms"] else "-"
        per = r["gateway_cpu_ms_per_request"]
        per_text = f"{per:.2f}" if per is not None else "-"
        print(f"| {r['front']} | {r['concurrency']} | **{r['requests_per_s']:.0f}** | {lat} | {r['errors'] or 0} | "
              f"{c['gateway']:.2f} / {c['router']:.2f} / {c['scheduler']:.2f} / {c['standin']:.2f} / {c['client']:.2f} | "
              f"{per_text} | {r['gateway_cpu_bound_requests_per_s'] or 0:.0f} |")


def print_profile(name: str, p: dict[str, Any], top: int, cpu_ms_per_request: float | None) -> None:
    per = (lambda pct: f"  ~{pct * cpu_ms_per_request / 100:.2f} ms/req") if cpu_ms_per_request else (lambda pct: "")
    print(f"\n(3) py-spy --gil, {name}: {p['samples']} samples holding the GIL"
          + (f"; ms/req = share x {cpu_ms_per_request:.2f} ms CPU per request (from (2))" if cpu_ms_per_request else ""))
    print("    by category (innermost matching frame):")
    for k, v in p["categories_pct"]:
        print(f"      {v:5.1f}%{per(v)}  {k}")
    print("    by Switchboard call site (innermost Switchboard frame, callees included):")
    for k, v in p["call_sites_pct"][:top]:
        print(f"      {v:5.1f}%  {k}")
    print("    own time by line (top frame; any code):")
    for k, v in p["own_lines_pct"][:top]:
        print(f"      {v:5.1f}%  {k}")
    print("    Switchboard functions, inclusive:")
    for k, v in p["functions_inclusive_pct"][:top]:
        print(f"      {v:5.1f}%  {k}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expert", default="bard-small", help="demo expert served in (1) (the smallest by default)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per target in (1)")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up rounds in (1)")
    parser.add_argument("--concurrency", default="32,64", help="closed-loop clients in (2), comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per throughput point")
    parser.add_argument("--tput-warmup", type=float, default=2.0, help="unmeasured seconds before each point")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP front in (2)")
    parser.add_argument("--no-profile", action="store_true", help="skip (3)")
    parser.add_argument("--profile-seconds", type=float, default=12.0)
    parser.add_argument("--skip", choices=("latency", "throughput"), default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--keep", type=Path, default=None, help="keep logs and raw profiles in this folder")
    # internal: the stand-in replicas' process
    parser.add_argument("--serve-instant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fingerprint", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ports", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_instant:
        asyncio.run(serve_instant(args.serve_instant, args.expert, args.fingerprint,
                                  [int(p) for p in args.ports.split(",")]))
        return 0

    from switchboard.experts import ensure_experts

    model = ensure_experts([args.expert])[args.expert]
    work = args.keep or Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tenants = work / "tenants.yaml"
    key = write_tenants(tenants)
    results: dict[str, Any] = {"machine": machine(), "python": platform.python_version(), "grpc": grpc.__version__,
                               "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "tenant_limits": BENCH_LIMITS}
    print(f"machine: {results['machine']}; Python {results['python']}; grpcio {grpc.__version__}", flush=True)

    if args.skip != "latency":
        print(f"(1) starting the local stack with {args.expert} ({model})...", flush=True)
        results["latency"] = added_latency(args, model, work, key, tenants)
        print_latency(results["latency"])

    if args.skip != "throughput":
        rows: list[dict[str, Any]] = []
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
        print("\n(2) starting scheduler, router, gateway and the instant stand-ins...", flush=True)
        with throughput_stack(model, args.expert, work, tenants) as stack:
            pids = stack["pids"]
            fronts = [("grpc", grpc_throughput, stack["gateway"])]
            if not args.no_http:
                fronts.append(("http", http_throughput, stack["http"]))
            for name, run, target in fronts:
                for c in levels:
                    row = asyncio.run(run(target, key, args.expert, c, args.duration, args.tput_warmup, pids))
                    row["front"] = "gRPC Gateway.Generate" if name == "grpc" else "HTTP /v1/completions (SSE)"
                    rows.append(row)
                    print(f"    {row['front']}, {c} clients: {row['requests_per_s']:.0f} req/s", flush=True)
            profiles: dict[str, Any] = {}
            if not args.no_profile and pyspy() is None:
                print("\n(3) skipped: py-spy is not installed (.venv/bin/pip install py-spy)")
            elif not args.no_profile:
                seconds = args.profile_seconds
                spies = {n: (start_pyspy(pids[n], work / f"{n}.pyspy.txt", seconds, 200), work / f"{n}.pyspy.txt")
                         for n in ("gateway", "router")}
                time.sleep(1.0)  # py-spy attaches
                row = asyncio.run(grpc_throughput(stack["gateway"], key, args.expert, levels[0], seconds - 2, 0.5, pids))
                for n, (proc, raw) in spies.items():
                    _, err = proc.communicate(timeout=60)
                    if raw.is_file():
                        profiles[n] = summarize_profile(raw)
                    else:
                        profiles[n] = {"error": err.decode(errors="replace")[-500:]}
                profiles["load"] = {"front": "grpc", "concurrency": levels[0], "requests_per_s": row["requests_per_s"]}
        standin_log = stack["standin_log"].read_text()
        results["throughput"] = rows
        results["standin"] = [json.loads(line) for line in standin_log.splitlines() if line.startswith("{")][-1:]
        print_throughput(rows)
        if results["standin"]:
            print(f"    stand-ins: {results['standin'][0]}")
        if profiles:
            results["profile"] = profiles
            for n in ("gateway", "router"):
                if "error" in profiles[n]:
                    print(f"\n(3) py-spy on the {n} failed: {profiles[n]['error']}")
                else:
                    grpc_row = next((r for r in rows if r["front"].startswith("gRPC") and r["concurrency"] == levels[0]), None)
                    per = (1000 * grpc_row["cpu_s"][n] / grpc_row["completed"]) if grpc_row and grpc_row["completed"] else None
                    print_profile(f"{n} during a gRPC run at {levels[0]} clients "
                                  f"({profiles['load']['requests_per_s']:.0f} req/s under the profiler)", profiles[n], 20, per)
    results["load_average_after"] = list(os.getloadavg())
    results["work_dir"] = str(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
