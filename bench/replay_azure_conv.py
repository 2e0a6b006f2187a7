"""Replay a window of the Azure conversation trace against Switchboard and `transformers serve`.

One command, two targets on the same demo-expert checkpoint, then `compare`:

    .venv/bin/python bench/replay_azure_conv.py            # 2-minute window, bard-small

1. Starts the local stack with only the chosen expert (`switchboard up` with a one-expert
   config, one generator replica), or uses a running gateway with `--gateway ADDR`.
2. Replays the window against the gateway over gRPC (expert pinned with `--model`).
3. Stops the stack, starts `transformers serve --continuous-batching` on the expert's folder
   (CPU, offline) and replays the same window (same prompts: same tokenizer, corpus, seed).
4. Runs `switchboard bench compare` and writes the plots.

Lengths are scaled to fit the experts' 512-token context (`--fit-context`). Every process
this script starts is stopped when it ends, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from bench_common import stop, switchboard_up

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TRACE = ROOT / ".." / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"


def parse_args() -> argparse.Namespace:
    """Command-line options (defaults: the README's run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expert", default="bard-small", help="demo expert to serve (its pool name in the stack)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="serve this Hugging Face folder instead of the demo expert's (pool name: --expert)")
    parser.add_argument("--window-start", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--speedup", type=float, default=1.0)
    parser.add_argument("--fit-context", type=int, default=512)
    parser.add_argument("--max-output-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0)
    parser.add_argument("--gateway", default=None, help="use this running gateway instead of starting a stack")
    parser.add_argument("--peer-port", type=int, default=8011)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "azure_conv")
    parser.add_argument("--skip", choices=("switchboard", "transformers"), default=None)
    return parser.parse_args()


@contextlib.contextmanager
def local_stack(expert: str, model: str, log: Path, ready_timeout_s: float = 900.0) -> Iterator[str]:
    """`switchboard up` with one expert and one replica; yields the gateway address."""
    config = Path(tempfile.mkdtemp()) / "experts.yaml"
    config.write_text(
        "experts:\n"
        f"  - name: {expert}\n"
        f"    description: the {expert} demo expert, alone, for the benchmark replay\n"
        f"    model: {model}\n"
        "    relative_cost: 1.0\n"
        "    replicas: 1\n"
    )
    with switchboard_up(config, log, ready_timeout_s=ready_timeout_s) as address:
        yield address


@contextlib.contextmanager
def transformers_serve(checkpoint: Path, port: int, log: Path, ready_timeout_s: float = 300.0) -> Iterator[str]:
    """`transformers serve --continuous-batching` on the checkpoint; yields its base URL."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "transformers"), "serve", str(checkpoint), "--continuous-batching",
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve not ready after {ready_timeout_s:.0f} s; see {log}")
            time.sleep(0.5)  # polling interval for readiness
        # Load the model and warm up once, so the replay does not time the first load.
        httpx.post(f"{base}/v1/completions", json={"model": str(checkpoint), "prompt": "Hail", "max_tokens": 2},
                   timeout=ready_timeout_s)
        yield base
    finally:
        stop(proc, grace_s=15.0)


def bench(target: str, out: Path, args: argparse.Namespace, tokenizer: Path, *extra: str) -> None:
    """One `switchboard bench run` of the window."""
    command = [str(VENV_BIN / "switchboard"), "bench", "run", "--target", target, "--tokenizer", str(tokenizer),
               "--trace", str(TRACE), "--window-start", str(args.window_start), "--duration", str(args.duration),
               "--speedup", str(args.speedup), "--fit-context", str(args.fit_context),
               "--max-output-tokens", str(args.max_output_tokens), "--timeout", str(args.timeout),
               "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
               "--temperature", "0", "--out", str(out), "--plots", str(out.parent), *extra]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=False)


def main() -> int:
    """Run both replays and the comparison."""
    args = parse_args()
    if args.model_dir is not None:
        checkpoint, model = args.model_dir.resolve(), str(args.model_dir.resolve())
    else:
        from switchboard.experts import ensure_experts

        checkpoint = ensure_experts([args.expert])[args.expert]
        # The stack gets the folder, not the name: both targets then serve the very same files.
        model = str(checkpoint)
    tokenizer = checkpoint / "tokenizer.json"
    args.out.mkdir(parents=True, exist_ok=True)
    ours, peer = args.out / "switchboard.json", args.out / "transformers_serve.json"
    if args.skip != "switchboard":
        if args.gateway:
            bench(f"grpc://{args.gateway}", ours, args, tokenizer, "--model", args.expert)
        else:
            with local_stack(args.expert, model, args.out / "stack.log") as address:
                bench(f"grpc://{address}", ours, args, tokenizer, "--model", args.expert)
    if args.skip != "transformers":
        with transformers_serve(checkpoint, args.peer_port, args.out / "transformers_serve.log") as base:
            bench(base, peer, args, tokenizer, "--model", str(checkpoint), "--openai-exact-output", "transformers")
    done = [p for p in (ours, peer) if p.is_file()]
    if len(done) == 2:
        subprocess.run([str(VENV_BIN / "switchboard"), "bench", "compare", *map(str, done),
                        "--plots", str(args.out)], check=False)
    return 0 if len(done) == (1 if args.skip else 2) else 1


if __name__ == "__main__":
    sys.exit(main())
