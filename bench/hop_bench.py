"""Hop benchmark: what one Python gRPC hop costs on this machine, bare and with the per-call
machinery every Switchboard hop carries (server span, metrics, decode, errors; client span and trace
context), against the peer: the same work done by OpenTelemetry's own grpc.aio interceptors
(opentelemetry-instrumentation-grpc) plus each server stage as an interceptor of its own, as the
services ran until 2026-12-02.

Three servers, each its own process, serve one echo service (unary, and unary-stream with one
message, the shape of `Generator.Generate` with max_tokens=1):
  - bare:        grpc.aio server without interceptors, client channel without interceptors;
  - peer:        OpenTelemetry's aio server interceptor, then MetricsInterceptor, DecodeInterceptor and
                 ErrorInterceptor as three more interceptors; OpenTelemetry's aio client interceptors;
  - switchboard: the services' server (`ServerPipeline`: ServerTracing, metrics, decode, errors, one
                 interceptor composed once per method) and channel (`TracedChannel`).
One client process calls them one call at a time, in rounds (each round: `--block` calls to each
server in turn, the order rotating), so a noisy neighbour hits the three alike. Tracing is on (an
SDK tracer provider without an exporter, as a service runs without OTEL_EXPORTER_OTLP_ENDPOINT).

Prints p50/p99 per variant and call shape, the ratio peer / switchboard (above 1: ours is cheaper),
and what the machinery costs over bare. The bare hop is the floor any request path pays per hop.

Run:  .venv/bin/python bench/hop_bench.py [--rounds 20] [--block 100] [--json OUT]     # about 1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from bench_common import machine

SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
VARIANTS = ("bare", "peer", "switchboard")
SHAPES = ("unary", "stream")


def install_tracing() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())


def server_interceptors(variant: str) -> list[Any]:
    from switchboard.common.interceptors import (
        DecodeInterceptor,
        ErrorInterceptor,
        MetricsInterceptor,
        ServerPipeline,
    )

    if variant == "peer":
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(), MetricsInterceptor("bench"), DecodeInterceptor(), ErrorInterceptor()]
    if variant == "switchboard":
        from switchboard.common.rpc_tracing import ServerTracing

        return [ServerPipeline([ServerTracing(), MetricsInterceptor("bench"), DecodeInterceptor(), ErrorInterceptor()])]
    return []


async def serve(variant: str, port_file: Path) -> None:
    from google.protobuf import wrappers_pb2

    install_tracing()
    server = grpc.aio.server(interceptors=server_interceptors(variant))

    async def unary(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value="y" * 20)

    async def stream(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext) -> Any:
        yield wrappers_pb2.StringValue(value="x" * 20)

    codec = {"request_deserializer": wrappers_pb2.StringValue.FromString, "response_serializer": wrappers_pb2.StringValue.SerializeToString}
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **codec),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, **codec),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.to_thread(port_file.write_text, str(port))
    await server.wait_for_termination()


def client_channel(variant: str, port: int) -> grpc.aio.Channel:
    address = f"127.0.0.1:{port}"
    if variant == "peer":
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return grpc.aio.insecure_channel(address, interceptors=aio_client_interceptors())
    if variant == "switchboard":
        from switchboard.common.channels import open_channel

        return open_channel(address)
    return grpc.aio.insecure_channel(address)


async def measure(ports: dict[str, int], rounds: int, block: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    from google.protobuf import wrappers_pb2

    install_tracing()
    request = wrappers_pb2.StringValue(value="a")
    codec = {"request_serializer": wrappers_pb2.StringValue.SerializeToString, "response_deserializer": wrappers_pb2.StringValue.FromString}
    channels = {v: client_channel(v, ports[v]) for v in VARIANTS}
    calls = {
        v: {"unary": channels[v].unary_unary(UNARY, **codec), "stream": channels[v].unary_stream(STREAM, **codec)} for v in VARIANTS
    }
    seconds: dict[str, dict[str, list[float]]] = {v: {s: [] for s in SHAPES} for v in VARIANTS}

    async def one(variant: str, shape: str) -> float:
        started = time.perf_counter()
        if shape == "unary":
            await calls[variant]["unary"](request, timeout=10)
        else:
            async for _ in calls[variant]["stream"](request, timeout=10):
                pass
        return time.perf_counter() - started

    for variant in VARIANTS:
        for shape in SHAPES:
            for _ in range(warmup):
                await one(variant, shape)
    for index in range(rounds):
        order = VARIANTS[index % 3 :] + VARIANTS[: index % 3]
        for shape in SHAPES:
            for variant in order:
                for _ in range(block):
                    seconds[variant][shape].append(await one(variant, shape))
    for channel in channels.values():
        await channel.close()
    return seconds


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=100, help="calls to one server before the next")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls per server and shape")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port_file))
        return

    print(f"machine: {machine()}")
    servers: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as folder:
        try:
            for variant in VARIANTS:
                port_file = Path(folder) / variant
                servers.append(
                    subprocess.Popen([sys.executable, __file__, "--serve", variant, "--port-file", str(port_file)], env=os.environ.copy())
                )
                deadline = time.monotonic() + 30
                while not (port_file.exists() and port_file.read_text()):
                    if time.monotonic() > deadline or servers[-1].poll() is not None:
                        raise SystemExit(f"the {variant} server did not start")
                    time.sleep(0.05)
                ports[variant] = int(port_file.read_text())
            seconds = asyncio.run(measure(ports, args.rounds, args.block, args.warmup))
        finally:
            for server in servers:
                server.kill()
                server.wait()

    calls = args.rounds * args.block
    print(f"\none hop, {calls} calls per variant and shape in {args.rounds} interleaved rounds, one at a time, ms p50 / p99")
    print("| shape | bare (the floor) | peer: OpenTelemetry's interceptors | switchboard | ratio peer / switchboard p50 | machinery over bare p50: peer / switchboard |")
    print("|---|---:|---:|---:|---:|---:|")
    report: dict[str, Any] = {"machine": machine(), "calls": calls, "rounds": args.rounds}
    for shape in SHAPES:
        row = {v: (quantile(seconds[v][shape], 0.5), quantile(seconds[v][shape], 0.99)) for v in VARIANTS}
        ratio = row["peer"][0] / row["switchboard"][0]
        over = (row["peer"][0] - row["bare"][0], row["switchboard"][0] - row["bare"][0])
        print(
            f"| {shape} | {row['bare'][0]:.3f} / {row['bare'][1]:.3f} | {row['peer'][0]:.3f} / {row['peer'][1]:.3f} | "
            f"{row['switchboard'][0]:.3f} / {row['switchboard'][1]:.3f} | {ratio:.2f}x | {over[0]:.3f} / {over[1]:.3f} |"
        )
        per_round = [
            statistics.median(seconds["peer"][shape][i * args.block : (i + 1) * args.block])
            / statistics.median(seconds["switchboard"][shape][i * args.block : (i + 1) * args.block])
            for i in range(args.rounds)
        ]
        per_round.sort()
        print(f"    {shape}: per-round ratio of medians, min / median / max: {per_round[0]:.2f} / {statistics.median(per_round):.2f} / {per_round[-1]:.2f}")
        report[shape] = {v: {"p50_ms": row[v][0], "p99_ms": row[v][1]} for v in VARIANTS} | {
            "ratio_p50": ratio,
            "per_round_ratio": per_round,
        }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
