"""The SSE stream parser against a real `transformers serve --continuous-batching`.

The server runs on a tiny random Llama checkpoint made here, with a byte-level BPE trained
on the demo corpus, on a free loopback port; it is always torn down.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from switchboard.bench.prompts import PromptSynthesizer
from switchboard.bench.runner import replay
from switchboard.bench.targets.openai_sse import OpenAITarget, parse_sse
from switchboard.bench.workload import TraceRequest

READY_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def transformers_serve(checkpoint: Path) -> Iterator[str]:
    """Run `transformers serve` on a free port until the block ends; yields its base URL."""
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [str(exe), "serve", str(checkpoint), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("transformers serve did not become ready")
            time.sleep(0.2)  # polling interval of the readiness check
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path) -> Iterator[tuple[str, Path]]:
    with transformers_serve(tiny_checkpoint) as base:
        yield base, tiny_checkpoint


async def lines_of(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_parse_sse_joins_data_lines_and_skips_comments() -> None:
    lines = [": keep-alive", "data: {\"a\":", "data: 1}", "", "event: x", "data:[DONE]", ""]
    assert [e async for e in parse_sse(lines_of(lines))] == ['{"a":\n1}', "[DONE]"]


@pytest.mark.slow
async def test_completions_stream_against_transformers_serve(served: tuple[str, Path], corpus_text: str) -> None:
    base, checkpoint = served
    synth = PromptSynthesizer.from_file(checkpoint / "tokenizer.json", corpus_text, block_size=16)
    reqs = [TraceRequest(i, 0.05 * i, 20 + 7 * i, 6 + i) for i in range(3)]
    prompts = [synth.build(r).text for r in reqs]
    target = OpenAITarget(base, str(checkpoint), exact_output="transformers")
    records = await replay(target, reqs, prompts, timeout_s=60)
    for req, rec in zip(reqs, records, strict=True):
        assert rec.status == "ok", rec.error
        # The server tokenized our prompt to exactly the length we synthesized.
        assert rec.prompt_tokens == req.input_tokens
        assert rec.output_tokens == req.output_tokens
        assert rec.finish_reason == "length"
        assert 1 <= len(rec.chunks) <= rec.output_tokens
        assert rec.ttft is not None and rec.e2e is not None and rec.e2e >= rec.ttft


@pytest.mark.slow
async def test_chat_stream_and_http_error_against_transformers_serve(served: tuple[str, Path]) -> None:
    base, checkpoint = served
    reqs = [TraceRequest(0, 0.0, 5, 4)]
    chat = await replay(OpenAITarget(base, str(checkpoint), chat=True, exact_output="transformers"), reqs,
                        ["Good morrow to thee"], timeout_s=60)
    assert chat[0].status == "ok", chat[0].error
    assert chat[0].output_tokens == 4 and chat[0].chunks
    # transformers serve rejects vLLM's min_tokens/ignore_eos fields: a recorded HTTP status, not a crash.
    rejected = await replay(OpenAITarget(base, str(checkpoint), exact_output="vllm"), reqs, ["Good morrow"],
                            timeout_s=60)
    assert rejected[0].status == "http_422"
    assert "Unexpected fields" in rejected[0].error


async def test_nothing_listening_is_a_connect_error() -> None:
    reqs = [TraceRequest(i, 0.0, 5, 4) for i in range(2)]
    records = await replay(OpenAITarget(f"http://127.0.0.1:{free_port()}", "m"), reqs, ["a", "b"], timeout_s=30)
    assert [r.status for r in records] == ["connect_error"] * 2
