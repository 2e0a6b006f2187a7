"""`switchboard generate "prompt"`: send a prompt to the gateway and print tokens as they stream.

The API key comes from --key or SWITCHBOARD_API_KEY (or the dev key that
`switchboard up` saved in the cache). Usage (prompt and completion tokens, the
expert that served) goes to stderr at the end, so stdout is just the text. When the gateway
is a stack that `switchboard up --traces` runs, the request is sent as the child of a root span
exported to its trace viewer, and the viewer's URL of the request's trace goes to stderr too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def _cache_dir() -> Path:
    return Path(os.environ.get("SWITCHBOARD_CACHE_DIR") or Path.home() / ".cache" / "switchboard").expanduser()


def resolve_key(explicit: str | None) -> str | None:
    """--key, else SWITCHBOARD_API_KEY, else the dev key saved by `switchboard up`."""
    if explicit:
        return explicit
    if os.environ.get("SWITCHBOARD_API_KEY"):
        return os.environ["SWITCHBOARD_API_KEY"]
    saved = _cache_dir() / "dev-api-key"
    return saved.read_text().strip() if saved.is_file() else None


def build_request(args: argparse.Namespace) -> gateway_pb2.GenerateRequest:
    """The GenerateRequest for the parsed command line."""
    sampling = common_pb2.SamplingParams(max_tokens=args.max_tokens)
    if args.temperature is not None:
        sampling.temperature = args.temperature
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.top_k:
        sampling.top_k = args.top_k
    if args.repetition_penalty is not None:
        sampling.repetition_penalty = args.repetition_penalty
    if args.seed is not None:
        sampling.seed = args.seed
    sampling.stop.extend(args.stop or [])
    request = gateway_pb2.GenerateRequest(prompt=args.prompt, sampling=sampling, model=args.model or "")
    if args.cost_weight is not None:
        request.cost_weight = args.cost_weight
    return request


def open_gateway_channel(addr: str, cacert: str | None) -> grpc.Channel:
    """A plaintext channel, or TLS verified against `cacert` (a gateway with GATEWAY_PUBLIC_TLS_*)."""
    if not cacert:
        return grpc.insecure_channel(addr)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(cacert).read_bytes())
    return grpc.secure_channel(addr, credentials)


def run(args: argparse.Namespace) -> int:
    """Stream one completion to stdout; exit 1 with the status on error."""
    key = resolve_key(args.key)
    if not key:
        print("switchboard generate: no API key: pass --key or set SWITCHBOARD_API_KEY", file=sys.stderr)
        return 2
    request = build_request(args)
    try:
        channel = open_gateway_channel(args.addr, args.cacert)
    except OSError as exc:
        print(f"switchboard generate: cannot read --cacert {args.cacert}: {exc.strerror}", file=sys.stderr)
        return 2
    # A stack run with `switchboard up --traces`: trace this request from here (imports the
    # OpenTelemetry SDK only then, so a plain `generate` stays quick to start).
    from switchboard.cli.traceviewer import read_session, trace_url

    session = read_session(_cache_dir(), args.addr)
    traced, link = None, ""
    if session is not None:
        from switchboard.cli.traceviewer import ClientTrace

        traced = ClientTrace(str(session["otlp"]))
        link = trace_url(str(session["ui"]), traced.trace_id)
    metadata = [("authorization", f"Bearer {key}"), *(traced.metadata() if traced else [])]
    error_text: str | None = None
    with channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        call = stub.Generate(request, metadata=metadata, timeout=args.timeout)
        model, last = "", None
        try:
            if args.echo:
                sys.stdout.write(args.prompt)
            for message in call:
                model = model or message.model
                sys.stdout.write(message.text)
                sys.stdout.flush()
                last = message
        except grpc.RpcError as error:
            error_text = f"{error.code().name}: {error.details()}"
            print(f"\nerror: {error_text}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            error_text = "cancelled"
            call.cancel()
            print("\ncancelled", file=sys.stderr)
            return 130
        finally:
            if traced is not None:
                traced.finish({"switchboard.request_id": last.request_id} if last is not None else {}, error=error_text)
                if error_text is not None:  # on success it follows the usage line
                    print(f"trace: {link}", file=sys.stderr)
    print()
    if last is not None:
        reason = common_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        print(
            f"[{model}] prompt_tokens={last.usage.prompt_tokens} completion_tokens={last.usage.completion_tokens} "
            f"finish={reason} request_id={last.request_id}" + (" cached=true" if last.usage.cached else ""),
            file=sys.stderr,
        )
    if link:
        print(f"trace: {link}", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `switchboard generate`."""
    parser = subparsers.add_parser("generate", help="send a prompt to the gateway and stream the answer", description=__doc__)
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--model", default=None, help="pin an expert (default: the router chooses)")
    parser.add_argument(
        "--cost-weight",
        type=float,
        default=None,
        help="the router's cost/quality knob: 0 = best expert, larger = cheaper (default: the router's)",
    )
    parser.add_argument("--max-tokens", type=int, default=0, help="tokens to generate (0: the gateway default)")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy; default 1.0")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 disables)")
    parser.add_argument(
        "--repetition-penalty", type=float, default=None, help="in [1, 2]; > 1 discourages repeats (default 1.0)"
    )
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (same seed, same text)")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--key", default=None, help="API key (default: SWITCHBOARD_API_KEY or the dev key)")
    parser.add_argument("--addr", default=os.environ.get("SWITCHBOARD_ADDR", "127.0.0.1:50051"), help="gateway host:port")
    parser.add_argument("--timeout", type=float, default=120.0, help="request deadline in seconds")
    parser.add_argument(
        "--cacert",
        default=os.environ.get("SWITCHBOARD_CACERT") or None,
        help="CA certificate (PEM) to verify a TLS gateway port with (default: SWITCHBOARD_CACERT; unset: plaintext)",
    )
    parser.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    parser.set_defaults(func=run)
