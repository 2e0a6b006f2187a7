"""Response-cache benchmark: the latency of a cache hit through the gateway, against a miss of the
same request and against the peer (the generator called straight), measured in the same run.

The real local stack (`switchboard up --no-gate --free-ports` with one demo expert, `bard-small` by
default, one generator replica) with the gateway's response cache on (`GATEWAY_CACHE=memory`). One
client process, grpc.aio, one reused channel per target, one request at a time, greedy
(temperature 0: deterministic, so cacheable). Each round sends three requests, the peer's place
among them rotating:
  - miss: `Gateway.Generate` of a prompt sent for the first time (gateway -> router -> scheduler ->
          generator; the answer is then stored);
  - hit:  the same request again, right after its miss (gateway -> router, answered from the cache;
          the replica does not run it);
  - peer: `Generator.Generate` straight to the generator's port (no auth, no routing, no cache) with
          a prompt of its own of the same shape (not the miss's: the replica's prefix cache would
          favour whichever of the two came second).
Prompts are a fixed line plus the round number, so every miss is a first time. Timed to the first
message with text (TTFT) and to the end of the stream, for each `--max-tokens` value. A hit is
checked (`usage.cached`, the same text as its miss); a request in the hit slot that was not a hit
(the store write runs after the miss's last message, so a very quick repeat could miss it) is
counted and left out of the hit sample, never silently mixed in. Ratios: hit / peer, hit / miss and
miss / peer at each quantile.

Run:  .venv/bin/python bench/cache_bench.py [--requests 200] [--max-tokens 1,32] [--json OUT]
(about 2 minutes on 2 cores). Nothing asserts a threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from bench_common import machine, quantiles_ms, switchboard_up
from gateway_bench import generator_address, one_expert_config, write_tenants

PROMPT = "To be, or not to be, that is the question:"
SIDES = ("peer", "miss", "hit")


async def rounds(
    gateway_addr: str, generator_addr: str, key: str, expert: str, max_tokens: int, requests: int, warmup: int,
    pki: Path, offset: int,
) -> dict[str, Any]:
    """`requests` timed rounds (after `warmup`) of peer / miss / hit; seconds to first text and to the end."""
    from switchboard.common.channels import open_channel
    from switchboard.common.tls import TlsIdentity
    from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, generator_pb2, generator_pb2_grpc

    clock = time.perf_counter
    metadata = (("authorization", f"Bearer {key}"),)
    # `switchboard up` runs the internal hops with mutual TLS: the peer call uses the stack's operator
    # identity, as the gateway's own call to the generator uses the gateway's.
    operator = TlsIdentity(pki / "ca.pem", pki / "operator.pem", pki / "operator-key.pem")
    gw_channel = grpc.aio.insecure_channel(gateway_addr)
    gen_channel = open_channel(generator_addr, operator if operator.cert_file.is_file() else None, peer_role="generator")
    gateway = gateway_pb2_grpc.GatewayStub(gw_channel)
    generator = generator_pb2_grpc.GeneratorStub(gen_channel)
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def peer(prompt: str) -> tuple[float, float, str, bool]:
        request = generator_pb2.GeneratorGenerateRequest(
            request_id=f"peer-{uuid.uuid4().hex[:12]}", prompt=prompt, sampling=params
        )
        start, first, text = clock(), None, []
        async for chunk in generator.Generate(request, timeout=60):
            if chunk.text and first is None:
                first = clock()
            text.append(chunk.text)
        end = clock()
        return (first or end) - start, end - start, "".join(text), False

    async def through(prompt: str) -> tuple[float, float, str, bool]:
        request = gateway_pb2.GenerateRequest(prompt=prompt, sampling=params, model=expert,
                                              request_id=f"cache-{uuid.uuid4().hex[:12]}")
        start, first, text, cached = clock(), None, [], False
        async for message in gateway.Generate(request, metadata=metadata, timeout=60):
            if message.text and first is None:
                first = clock()
            text.append(message.text)
            cached = cached or message.usage.cached
        end = clock()
        return (first or end) - start, end - start, "".join(text), cached

    samples: dict[str, dict[str, list[float]]] = {s: {"ttft": [], "total": []} for s in SIDES}
    hit_slot_misses = wrong_text = stored_in_miss = 0
    try:
        for i in range(-warmup, requests):
            n = offset + i + warmup
            gw_prompt, peer_prompt = f"{PROMPT} {2 * n + 1:05d}", f"{PROMPT} {2 * n:05d}"
            order = [("miss", gw_prompt), ("hit", gw_prompt)]
            order.insert(i % 3, ("peer", peer_prompt))  # peer first, between, or last
            results: dict[str, tuple[float, float, str, bool]] = {}
            for side, prompt in order:
                results[side] = await (peer(prompt) if side == "peer" else through(prompt))
            if i < 0:
                continue
            stored_in_miss += results["miss"][3]  # a miss that was a hit: the prompt was not new
            hit = results["hit"]
            if not hit[3]:
                hit_slot_misses += 1
            elif hit[2] != results["miss"][2]:
                wrong_text += 1
            for side in SIDES:
                if side == "hit" and not hit[3]:
                    continue
                samples[side]["ttft"].append(results[side][0])
                samples[side]["total"].append(results[side][1])
    finally:
        await gw_channel.close()
        await gen_channel.close()
    out: dict[str, Any] = {"max_tokens": max_tokens, "requests": requests, "warmup": warmup,
                           "hit_slot_not_cached": hit_slot_misses, "hit_text_differs": wrong_text,
                           "miss_slot_cached": stored_in_miss}
    for side in SIDES:
        out[side] = {metric: quantiles_ms(values) for metric, values in samples[side].items()}
    for metric in ("ttft", "total"):
        out[f"ratios_{metric}"] = {
            pair: {q: out[a][metric][q] / out[b][metric][q] for q in ("p50", "p90", "p99")}
            for pair, (a, b) in {"hit/peer": ("hit", "peer"), "hit/miss": ("hit", "miss"),
                                 "miss/peer": ("miss", "peer")}.items()
        }
    return out


def print_result(r: dict[str, Any]) -> None:
    print(f"\nmax_tokens={r['max_tokens']}, {r['requests']} rounds (+{r['warmup']} warm-up); "
          f"hit slot not cached: {r['hit_slot_not_cached']}, hit text differs: {r['hit_text_differs']}, "
          f"miss slot cached: {r['miss_slot_cached']}")
    print("| side | to first token p50 / p90 / p99 ms | to end of stream p50 / p90 / p99 ms |")
    print("|---|---:|---:|")
    for side in SIDES:
        cells = [" / ".join(f"{r[side][m][q]:.2f}" for q in ("p50", "p90", "p99")) for m in ("ttft", "total")]
        print(f"| {side} | {cells[0]} | {cells[1]} |")
    for pair in ("hit/peer", "hit/miss", "miss/peer"):
        cells = [" / ".join(f"{r[f'ratios_{m}'][pair][q]:.3f}" for q in ("p50", "p90", "p99")) for m in ("ttft", "total")]
        print(f"| ratio {pair} | {cells[0]} | {cells[1]} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expert", default="bard-small", help="demo expert served (the smallest by default)")
    parser.add_argument("--requests", type=int, default=200, help="timed rounds per --max-tokens value")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up rounds per --max-tokens value")
    parser.add_argument("--max-tokens", default="1,32", help="answer lengths, comma-separated")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the stack's logs in this folder")
    args = parser.parse_args(argv)

    from switchboard.experts import ensure_experts

    model = ensure_experts([args.expert])[args.expert]
    work = args.keep or Path(tempfile.mkdtemp(prefix="cache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tenants = work / "tenants.yaml"
    key = write_tenants(tenants)
    config = one_expert_config(work, args.expert, model)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    results: dict[str, Any] = {"machine": machine(), "uptime_before": uptime, "python": platform.python_version(),
                               "grpc": grpc.__version__, "expert": args.expert, "model": str(model),
                               "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "runs": []}
    print(f"machine: {results['machine']}; Python {results['python']}; grpcio {grpc.__version__}\nuptime: {uptime}", flush=True)
    env = {"SWITCHBOARD_CACHE_DIR": str(work / "cache"), "GATEWAY_TENANTS_FILE": str(tenants), "GATEWAY_CACHE": "memory"}
    log = work / "up.log"
    with switchboard_up(config, log, args=["--no-gate", "--free-ports"], env=env, ready_timeout_s=300) as gateway:
        generator = generator_address(log)
        print(f"stack up: gateway {gateway} (GATEWAY_CACHE=memory), generator {generator} ({args.expert})", flush=True)
        offset = 0
        for max_tokens in [int(x) for x in args.max_tokens.split(",") if x.strip()]:
            run = asyncio.run(rounds(gateway, generator, key, args.expert, max_tokens, args.requests, args.warmup,
                                     work / "cache" / "pki", offset))
            offset += args.requests + args.warmup
            results["runs"].append(run)
            print_result(run)
    results["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    results["load_average_after"] = list(os.getloadavg())
    print(f"\nuptime after: {results['uptime_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
