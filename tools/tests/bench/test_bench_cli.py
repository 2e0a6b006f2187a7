"""`switchboard bench run|compare|plot` end to end against a real gRPC Gateway server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from switchboard.bench.results import SCHEMA
from switchboard.cli.main import main
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

KEY = "cli-key"


class ThreadedGateway(gateway_pb2_grpc.GatewayServicer):
    """Streams one token per message, `max_tokens` of them; rejects prompts over 200 tokens' worth."""

    def __init__(self) -> None:
        self.prompts: dict[str, str] = {}

    def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[gateway_pb2.GenerateResponse]:
        self.prompts[request.request_id] = request.prompt
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {KEY}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        if len(request.prompt) > 2000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")
        for _ in range(request.sampling.max_tokens):
            yield gateway_pb2.GenerateResponse(text="a", token_count=1)
        yield gateway_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_LENGTH,
                                           usage=common_pb2.Usage(prompt_tokens=1,
                                                                  completion_tokens=request.sampling.max_tokens))


@pytest.fixture
def gateway() -> Iterator[tuple[str, ThreadedGateway]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = ThreadedGateway()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


@pytest.fixture
def gateway_address(gateway: tuple[str, ThreadedGateway]) -> str:
    return gateway[0]


def run_args(address: str, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "run", "--target", f"grpc://{address}", "--api-key", KEY, "--tokenizer", str(tokenizer),
            "--synthetic", "gamma", "--burstiness", "0.5", "--rate", "50", "--num-requests", "12",
            "--input-len", "uniform:10:40", "--output-len", "fixed:3", "--timeout", "30", "--no-progress",
            "--slo-ttft-ms", "5000", "--out", str(out), *extra]


def test_run_compare_and_plot(gateway_address: str, tokenizer_json: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    argv = run_args(gateway_address, tokenizer_json, first, "--plots", str(tmp_path / "plots"))
    monkeypatch.setattr("sys.argv", ["switchboard", *argv])  # as the console script sees it
    assert main(argv) == 0
    assert main(run_args(gateway_address, tokenizer_json, second, "--max-requests", "6")) == 0
    doc = json.loads(first.read_text())
    assert doc["schema"] == SCHEMA
    assert doc["command_line"] == ["switchboard", *[a if a != KEY else "<redacted>" for a in argv]]
    assert doc["target"]["kind"] == "grpc" and doc["target"]["api_key_set"] is True
    assert KEY not in first.read_text()  # the key is never written
    assert doc["workload"]["source"]["arrivals"] == "gamma"
    assert doc["workload"]["prompts"]["count"] == 12
    assert doc["machine"]["cpu_count"] >= 1 and doc["git_revision"]
    assert doc["summary"]["requests_completed"] == 12 and doc["summary"]["output_tokens_total"] == 36
    assert [r["status"] for r in doc["requests"]] == ["ok"] * 12
    assert all(10 <= r["input_tokens"] <= 40 and len(r["chunks"]) == 3 for r in doc["requests"])
    assert json.loads(second.read_text())["summary"]["requests_sent"] == 6
    for png in (tmp_path / "plots").iterdir():
        assert png.suffix == ".png" and 0 < png.stat().st_size < 300_000
    assert len(list((tmp_path / "plots").iterdir())) == 2

    capsys.readouterr()
    assert main(["bench", "compare", str(first), str(second), "--plots", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "ratios vs a" in table and "0.50x" in table  # 6 completed vs 12
    assert main(["bench", "plot", str(first), "--out", str(tmp_path / "p")]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["latency_cdf.png", "timeline.png"]


def test_unreachable_target_exits_nonzero_with_every_request_accounted(tokenizer_json: Path, tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.stop(0)  # nobody listens on the port any more
    out = tmp_path / "down.json"
    assert main(run_args(f"127.0.0.1:{port}", tokenizer_json, out)) == 1
    summary = json.loads(out.read_text())["summary"]
    assert summary["requests_sent"] == 12 and summary["status_counts"] == {"UNAVAILABLE": 12}


def test_bad_inputs_are_clear_errors(tokenizer_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_trace = tmp_path / "bad.csv"
    bad_trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,x,1\n")
    code = main(["bench", "run", "--target", "grpc://127.0.0.1:1", "--tokenizer", str(tokenizer_json),
                 "--trace", str(bad_trace), "--out", str(tmp_path / "o.json")])
    assert code == 2
    assert f"{bad_trace}:2: ContextTokens must be an integer" in capsys.readouterr().err
    assert main(["bench", "run", "--target", "ftp://x", "--tokenizer", str(tokenizer_json), "--synthetic",
                 "poisson", "--out", str(tmp_path / "o.json")]) == 2
    assert "--target must start with" in capsys.readouterr().err
    assert main(["bench", "run", "--target", "grpc://127.0.0.1:1", "--tokenizer", str(tokenizer_json), "--synthetic",
                 "poisson", "--timeout", "0", "--out", str(tmp_path / "o.json")]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err
    assert main(["bench", "compare", str(bad_trace), str(bad_trace)]) == 2
    assert "not a readable results file" in capsys.readouterr().err


def test_jsonl_hash_blocks_reach_the_server_shared_after_scaling(gateway: tuple[str, ThreadedGateway],
                                                                 tokenizer_json: Path, tmp_path: Path) -> None:
    address, servicer = gateway
    trace = tmp_path / "prefix.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 400, "output_length": 4, "hash_ids": [1, 2, 3, 4]},
        {"timestamp": 10, "input_length": 400, "output_length": 4, "hash_ids": [1, 2, 5, 6]},
        {"timestamp": 20, "input_length": 400, "output_length": 4, "hash_ids": [7, 8, 9, 10]},
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prefix.json"
    assert main(["bench", "run", "--target", f"grpc://{address}", "--api-key", KEY, "--tokenizer",
                 str(tokenizer_json), "--trace", str(trace), "--block-size", "100", "--length-scale", "0.5",
                 "--no-progress", "--warmup-requests", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["workload"]["prompts"]["block_size_used"] == 50
    assert [r["input_tokens"] for r in doc["requests"]] == [200, 200, 200]
    a, b, c = (servicer.prompts[f"bench-{i}"] for i in range(3))

    def common(x: str, y: str) -> int:
        return next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))

    # Requests 0 and 1 share blocks 1 and 2 (about half of each prompt); request 2 shares nothing.
    assert common(a, b) >= 0.4 * min(len(a), len(b))
    assert common(a, b) < min(len(a), len(b))
    assert common(a, c) < 0.05 * len(a)
