"""Router benchmark: decision latency by prompt length, and the router's added latency to a request.

Prints two tables, each against a named peer measured in the same run:
  (1) decision latency (`RouterCore.decide`: gate + selector, what the router reports as its decision
      time) p50/p90/p99/max by prompt length, for the default learned gate and for the peer, the
      built-in n-gram rule (`NgramGate` on the experts' descriptions, the router's fallback), both
      through the same core; then the learned gate's time split (tokenizer, features, network, selector)
  (2) the router's added latency to a request: `Router.Route` RPCs to a real router in front of a real
      scheduler (in-process, loopback, a real channel) against the peer, direct `Scheduler.Place`
      RPCs with the same experts (what a gateway pays to place a request without the router)

Run: .venv/bin/python bench/router_bench.py [--iterations N] [--lengths 200,2000,...] [--json OUT] [--quick]
Prompts are real held-out text: the test split of the router dataset the gate was trained on (its
folder is `training.dataset.folder` in gate.json), prompts concatenated to reach the longer lengths.
The gate is `--gate DIR`, else the default gate (`switchboard router build`, cached). Gate and peer
alternate in blocks over the run, because the machine is shared and noisy.
Targets: decision p99 <= 1 ms at 2,000 characters and <= 5 ms at the gateway's 32,000-character limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from bench_common import machine, quantiles_ms
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.common.channels import open_channel
from switchboard.common.experts_config import ExpertSpec, load_experts_config
from switchboard.common.logging import configure_logging
from switchboard.common.service import GrpcService, wait_started
from switchboard.common.settings import ServerSettings
from switchboard.router.config import RouterSettings
from switchboard.router.core import RouteInput, RouterCore
from switchboard.router.learned_gate import LearnedGate
from switchboard.router.server import build_core, serve
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SchedulerSettings
from switchboard.v1 import common_pb2, router_pb2, router_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERTS_CONFIG = REPO_ROOT / "config" / "experts.yaml"
DEFAULT_LENGTHS = (200, 2_000, 8_000, 32_000)
TARGETS_MS = {2_000: 1.0, 32_000: 5.0}  # decision p99 targets (issue acceptance)
VARIANTS = 32  # distinct prompts per length, cycled over the iterations
BLOCK = 100  # iterations of one side before the other side's turn
REPLICAS_PER_EXPERT = 2
MAX_TOKENS = 16


# --- prompts ---------------------------------------------------------------------------------


def held_out_prompts(gate_dir: Path) -> tuple[Path, list[str]]:
    """The test-split prompts of the dataset the gate was trained on, in file order."""
    config = json.loads((gate_dir / "gate.json").read_text())
    folder = Path(config["training"]["dataset"]["folder"])
    prompts = []
    with (folder / "records.jsonl").open() as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "test" and record.get("prompt", "").strip():
                prompts.append(record["prompt"])
    if not prompts:
        raise SystemExit(f"{folder / 'records.jsonl'} holds no test prompts")
    return folder, prompts


def prompts_of_length(corpus: Sequence[str], length: int, variants: int) -> list[str]:
    """`variants` prompts of exactly `length` characters: consecutive held-out prompts joined by a
    newline, each variant starting at another prompt (wrapping around the corpus)."""
    out = []
    stride = max(1, len(corpus) // variants)
    for v in range(variants):
        parts: list[str] = []
        size = 0
        i = v * stride
        while size < length:
            text = corpus[i % len(corpus)]
            parts.append(text)
            size += len(text) + 1
            i += 1
        out.append("\n".join(parts)[:length])
    return out


# --- (1) decision latency --------------------------------------------------------------------


class _NoPlacer:
    """decide() never places; a route() through this core would fail loudly."""

    async def place(self, request: object) -> object:
        raise RuntimeError("the decision benchmark does not place requests")


def build_cores(gate_dir: Path, experts_config: Path) -> tuple[RouterCore, RouterCore]:
    """(learned, n-gram) cores wired exactly as the router's server does (`build_core`)."""
    experts = load_experts_config(experts_config)
    server = ServerSettings(port=0, metrics_port=0)
    learned = build_core(RouterSettings(server=server, experts_config=experts_config, gate_path=gate_dir),
                         experts, _NoPlacer())  # type: ignore[arg-type]
    ngram = build_core(RouterSettings(server=server, experts_config=experts_config, gate_path=None),
                       experts, _NoPlacer())  # type: ignore[arg-type]
    return learned, ngram


def time_decide(
    core: RouterCore, prompts: Sequence[str], count: int, start: int, cpu: list[float] | None = None
) -> list[float]:
    """`count` decisions over the prompts (from index `start`): the seconds decide() reports.

    cpu: when given, also gets each decision's thread CPU time (around the call), which leaves out
    the time the thread was descheduled: on a shared machine the gap to the wall time is the noise.
    """
    out = []
    for i in range(start, start + count):
        request = RouteInput(request_id=f"b{i}", prompt=prompts[i % len(prompts)], max_tokens=MAX_TOKENS)
        before = time.thread_time()
        _, _, seconds = core.decide(request)
        if cpu is not None:
            cpu.append(time.thread_time() - before)
        out.append(seconds)
    return out


def decision_latency(
    cores: dict[str, RouterCore], prompts: Sequence[str], iterations: int, warmup: int
) -> dict[str, list[float]]:
    """Every core's decide() times on these prompts, the cores alternating in blocks; also
    `<name>_cpu`, the thread CPU time of the same calls."""
    for core in cores.values():
        time_decide(core, prompts, warmup, 0)
    gc.collect()
    samples: dict[str, list[float]] = {name: [] for name in cores} | {f"{name}_cpu": [] for name in cores}
    done = 0
    while done < iterations:
        block = min(BLOCK, iterations - done)
        for name, core in cores.items():
            # Each block starts from a collected heap: in a router only one gate runs, so the
            # other gate's garbage must not be collected during this one's decisions.
            gc.collect()
            samples[name].extend(time_decide(core, prompts, block, done, samples[f"{name}_cpu"]))
        done += block
    return samples


def time_split(core: RouterCore, prompts: Sequence[str], iterations: int, warmup: int) -> dict[str, list[float]]:
    """The learned gate's parts, each timed on its own, in the order decide() runs them:
    tokenize (the feature tokenizer on the prefix, also inside features), features
    (FeatureExtractor.extract), network (the numpy forward of GateNet that serves, back to tuples) and selector (online
    correction, eligibility and Selector.select, as decide() calls them)."""
    gate = core.gate
    assert isinstance(gate, LearnedGate)
    extractor = gate.extractor
    parts: dict[str, list[float]] = {"tokenize": [], "features": [], "network": [], "selector": []}
    clock = time.perf_counter
    for i in range(warmup + iterations):
        prompt = prompts[i % len(prompts)]
        request = RouteInput(request_id=f"s{i}", prompt=prompt, max_tokens=MAX_TOKENS)
        t0 = clock()
        extractor.token_ids(prompt[: extractor.config.max_chars])
        t1 = clock()
        features = extractor.extract(prompt)
        t2 = clock()
        quality_a, hidden_a = gate.fast.forward(features)  # what LearnedGate.score serves with
        quality, hidden = tuple(quality_a.tolist()), tuple(hidden_a.tolist())
        t3 = clock()
        correction = core.online.correction(hidden) if core.online is not None else None
        core.selector.select(
            dict(zip(gate.experts, quality, strict=True)),
            gate.temperature,
            cost_weight=core.cost_weight_for(request),
            bias=core.load_bias.bias,
            correction=correction,
            ineligible=core.ineligible(request),
            unavailable=core.unavailable(request, features.prompt_tokens),
        )
        t4 = clock()
        if i >= warmup:
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[name].append(seconds)
    return parts


# --- (2) added latency over real RPCs --------------------------------------------------------


@contextlib.asynccontextmanager
async def running_stack(gate_dir: Path, experts_config: Path) -> Any:
    """A real scheduler and a real router (this gate) on free loopback ports, as in
    services/router/tests/conftest.py; yields (router stub, scheduler stub, router health stub)."""
    names = [spec.name for spec in load_experts_config(experts_config)]
    # Registered replicas send no heartbeats here, so they must not expire during the run.
    scheduler = SchedulerApp(
        SchedulerSettings(server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2), expiry_seconds=3600.0),
        names,
    )
    scheduler_task = asyncio.create_task(scheduler.run(handle_signals=False))
    await wait_started(scheduler_task, scheduler.service.started)
    settings = RouterSettings(
        server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2),
        scheduler_addr=f"127.0.0.1:{scheduler.service.port}",
        experts_config=experts_config,
        gate_path=gate_dir,
    )
    service = GrpcService("router", settings.server)
    router_task = asyncio.create_task(serve(settings, service, handle_signals=False))
    await wait_started(router_task, service.started)
    sched_channel = open_channel(f"127.0.0.1:{scheduler.service.port}")
    router_channel = open_channel(f"127.0.0.1:{service.port}")
    try:
        yield (
            router_pb2_grpc.RouterStub(router_channel),
            scheduler_pb2_grpc.SchedulerStub(sched_channel),
            health_pb2_grpc.HealthStub(router_channel),
        )
    finally:
        await router_channel.close()
        await sched_channel.close()
        service.stop()
        await router_task
        scheduler.service.stop()
        await scheduler_task


async def register_replicas(scheduler: scheduler_pb2_grpc.SchedulerStub, experts: Sequence[ExpertSpec]) -> None:
    """A few idle replicas of every expert (fake addresses: Route and Place never connect to them).
    max_model_len is large so that a 32,000-character prompt fits (the demo experts take 512 tokens)."""
    port = 60000
    for spec in experts:
        for r in range(REPLICAS_PER_EXPERT):
            port += 1
            await scheduler.Register(scheduler_pb2.RegisterRequest(
                replica_id=f"{spec.name}-{r}", expert=spec.name, address=f"127.0.0.1:{port}", device="cpu",
                model_name=spec.name, max_model_len=65536,
                load=scheduler_pb2.ReplicaLoad(kv_blocks_total=100),
            ))


async def rpc_latency(
    router: router_pb2_grpc.RouterStub,
    scheduler: scheduler_pb2_grpc.SchedulerStub,
    health: health_pb2_grpc.HealthStub,
    experts: Sequence[str],
    prompts: Sequence[str],
    iterations: int,
    warmup: int,
    min_warmup_seconds: float,
) -> dict[str, list[float]]:
    """Route and Place round trips, one at a time, the two alternating call by call. Every placed
    request is completed (Scheduler.Complete, untimed) so the replicas' in-flight counts stay flat.
    Also `hop`: the router's grpc.health.v1 Check, one bare round trip through the router's server
    and interceptors (what the extra hop costs before the router does any work)."""
    clock = time.perf_counter
    sampling = common_pb2.SamplingParams(max_tokens=MAX_TOKENS)

    async def route(i: int) -> float:
        request = router_pb2.RouteRequest(request_id=f"route-{i}", prompt=prompts[i % len(prompts)], sampling=sampling)
        t = clock()
        reply = await router.Route(request, timeout=5.0)
        seconds = clock() - t
        await scheduler.Complete(scheduler_pb2.SchedulerCompleteRequest(
            request_id=request.request_id, replica_id=reply.candidates[0].replica_id, success=True))
        return seconds

    async def place(i: int) -> float:
        prompt = prompts[i % len(prompts)]
        tokens = max(1, len(prompt) // 4)  # a gateway's estimate without the router's tokenizer
        request = scheduler_pb2.PlaceRequest(
            request_id=f"place-{i}", experts=list(experts), prompt_tokens=tokens, max_tokens=MAX_TOKENS,
            min_model_len=tokens + MAX_TOKENS, max_alternates=2,
        )
        t = clock()
        reply = await scheduler.Place(request, timeout=5.0)
        seconds = clock() - t
        await scheduler.Complete(scheduler_pb2.SchedulerCompleteRequest(
            request_id=request.request_id, replica_id=reply.placements[0].replica.replica_id, success=True))
        return seconds

    async def hop(i: int) -> float:
        t = clock()
        await health.Check(health_pb2.HealthCheckRequest(service="switchboard.v1.Router"), timeout=5.0)
        return clock() - t

    # Warm-up also lets the router's cluster watcher (every 0.5 s) see the replicas.
    started = time.monotonic()
    i = 0
    while i < warmup or time.monotonic() - started < min_warmup_seconds:
        await route(i)
        await place(i)
        await hop(i)
        i += 1
    gc.collect()
    samples: dict[str, list[float]] = {"route": [], "place": [], "hop": []}
    for i in range(iterations):
        first, second = (route, place) if i % 2 == 0 else (place, route)
        samples[first.__name__].append(await first(i))
        samples[second.__name__].append(await second(i))
        samples["hop"].append(await hop(i))
    return samples


async def added_latency(
    gate_dir: Path, experts_config: Path, prompts: dict[int, list[str]], iterations: int, warmup: int,
    min_warmup_seconds: float,
) -> dict[int, dict[str, list[float]]]:
    """Route vs Place samples at every prompt length, on one running stack."""
    experts = load_experts_config(experts_config)
    names = [spec.name for spec in experts]
    out = {}
    async with running_stack(gate_dir, experts_config) as (router, scheduler, health):
        await register_replicas(scheduler, experts)
        for length, batch in prompts.items():
            out[length] = await rpc_latency(
                router, scheduler, health, names, batch, iterations, warmup, min_warmup_seconds
            )
    return out


# --- main ------------------------------------------------------------------------------------


def default_gate(experts_config: Path) -> Path:
    """The default gate of the experts config (built and cached by `switchboard router build`)."""
    from switchboard.routing.gate_cli import build_default_gate

    return build_default_gate(experts_config, progress=lambda message: print(message, file=sys.stderr))


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The services' JSON log lines (one `routed` line per Route, written as in production) go to
    /dev/null instead of between the tables."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def fmt(stats: dict[str, float], keys: Sequence[str] = ("p50", "p90", "p99", "max")) -> str:
    """'a / b / c / d' in ms."""
    return " / ".join(f"{stats[k]:.3f}" for k in keys)


def ratios(peer: dict[str, float], ours: dict[str, float], keys: Sequence[str] = ("p50", "p90", "p99", "max")) -> str:
    """'peer/ours' per quantile."""
    return " / ".join(f"{peer[k] / ours[k]:.1f}x" for k in keys)


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000, help="timed decisions per gate and length")
    parser.add_argument("--rpc-iterations", type=int, default=1000, help="timed Route and Place RPCs each, per length")
    parser.add_argument("--lengths", default=",".join(str(n) for n in DEFAULT_LENGTHS),
                        help="prompt lengths in characters, comma-separated")
    parser.add_argument("--gate", type=Path, default=None, help="gate artifact folder (default: the default gate)")
    parser.add_argument("--experts-config", type=Path, default=EXPERTS_CONFIG)
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--quick", action="store_true", help="few iterations (a smoke run; the numbers mean little)")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    iterations, rpc_iterations, warmup, min_warmup = args.iterations, args.rpc_iterations, 200, 1.0
    if args.quick:
        iterations, rpc_iterations, warmup, min_warmup = 50, 30, 10, 0.6
    # As the router's serve() does: the gate's matmuls are tiny, one thread is fastest.
    torch.set_num_threads(1)
    configure_logging("router-bench", "info")

    gate_dir = args.gate or default_gate(args.experts_config)
    dataset, corpus = held_out_prompts(gate_dir)
    prompts = {n: prompts_of_length(corpus, n, VARIANTS) for n in lengths}
    with quiet_logs():
        learned, ngram = build_cores(gate_dir, args.experts_config)
    results: dict[str, Any] = {
        "machine": machine(torch_threads=torch.get_num_threads()), "torch": torch.__version__, "python": platform.python_version(),
        "gate": {"path": str(gate_dir), "version": learned.gate.version}, "dataset": str(dataset),
        "held_out_prompts": len(corpus), "iterations": iterations, "rpc_iterations": rpc_iterations,
        "warmup": warmup, "quick": args.quick,
    }
    print(f"machine: {results['machine']}; torch {torch.__version__}; Python {results['python']}")
    print(f"gate: {gate_dir} (version {learned.gate.version}); prompts: {len(corpus)} held-out prompts of {dataset}, "
          f"{VARIANTS} distinct per length")

    # (1) decision latency by prompt length, learned gate vs the n-gram rule through the same core.
    print(f"\n(1) decision latency, RouterCore.decide (gate + selector), {iterations} decisions per gate and length, ms")
    print("| prompt chars | learned p50 / p90 / p99 / max | n-gram rule p50 / p90 / p99 / max | ratio (n-gram / learned) "
          "| learned CPU time p50 / p99 | target p99 |")
    print("|---:|---:|---:|---:|---:|---:|")
    decision: dict[str, Any] = {}
    for n in lengths:
        samples = decision_latency({"learned": learned, "ngram": ngram}, prompts[n], iterations, warmup)
        stats = {name: quantiles_ms(s) for name, s in samples.items()}
        target = TARGETS_MS.get(n)
        met = "" if target is None else f"<= {target:g} ({'met' if stats['learned']['p99'] <= target else 'MISSED'})"
        decision[str(n)] = {**stats, "ratio_ngram_over_learned": {k: stats["ngram"][k] / stats["learned"][k]
                                                                   for k in ("p50", "p90", "p99", "max")},
                            "target_p99_ms": target}
        print(f"| {n:,} | {fmt(stats['learned'])} | {fmt(stats['ngram'])} | {ratios(stats['ngram'], stats['learned'])} "
              f"| {fmt(stats['learned_cpu'], ('p50', 'p99'))} | {met} |")
    results["decision"] = decision

    print(f"\n    learned gate's time split, {iterations} calls per length, ms p50 / p99 (each part timed on its own)")
    print("| prompt chars | tokenize (in features) | features | network | selector | sum of p50s | decide p50 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    split: dict[str, Any] = {}
    for n in lengths:
        parts = {name: quantiles_ms(s) for name, s in time_split(learned, prompts[n], iterations, warmup).items()}
        total = sum(parts[k]["p50"] for k in ("features", "network", "selector"))
        split[str(n)] = {**parts, "sum_p50": total}
        cells = " | ".join(fmt(parts[k], ("p50", "p99")) for k in ("tokenize", "features", "network", "selector"))
        print(f"| {n:,} | {cells} | {total:.3f} | {decision[str(n)]['learned']['p50']:.3f} |")
    results["split"] = split

    # (2) the router's added latency to a request.
    print(f"\n(2) added latency: Router.Route vs Scheduler.Place over loopback gRPC, in-process servers, "
          f"{rpc_iterations} each per length, one at a time, ms")
    with quiet_logs():
        rpc = asyncio.run(added_latency(gate_dir, args.experts_config, prompts, rpc_iterations, warmup, min_warmup))
    print("| prompt chars | Route p50 / p99 | Place p50 / p99 (peer) | added p50 / p99 | ratio (Route / Place) p50 / p99 "
          "| bare hop p50 / p99 |")
    print("|---:|---:|---:|---:|---:|---:|")
    added: dict[str, Any] = {}
    for n in lengths:
        route, place, bare = (quantiles_ms(rpc[n][k]) for k in ("route", "place", "hop"))
        diff = {k: route[k] - place[k] for k in ("p50", "p90", "p99")}
        ratio = {k: route[k] / place[k] for k in ("p50", "p90", "p99")}
        added[str(n)] = {"route": route, "place": place, "added": diff, "ratio_route_over_place": ratio,
                         "bare_hop": bare}
        print(f"| {n:,} | {fmt(route, ('p50', 'p99'))} | {fmt(place, ('p50', 'p99'))} | {fmt(diff, ('p50', 'p99'))} | "
              f"{ratio['p50']:.2f}x / {ratio['p99']:.2f}x | {fmt(bare, ('p50', 'p99'))} |")
    print("    added = decision (table 1) + one more gRPC hop (bare hop: the router's health Check) + the rest of "
          "the router's work (messages with the prompt and the scores, spans, metrics, the log line)")
    results["rpc"] = added
    results["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
