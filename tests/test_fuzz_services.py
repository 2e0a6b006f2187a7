"""A storm of malformed and hostile requests at every internal service of one real stack.

The gateway has its own fuzz test (services/gateway/tests/test_fuzz.py); this one fuzzes the
scheduler, the router and the generator as processes over real sockets with mutual TLS. Each
method is called with an identity its policy allows (the router's for Place/Complete, the
gateway's for Route/Feedback/Generate, fuzz generator identities `generator/fuzz-<n>` issued from
the stack's CA for Register/ReportLoad/Deregister, so the real replica is never touched), plus a
few calls with a refused identity. Seeded generators send raw bytes (no serializer): valid
requests, decodable requests with absurd values (10,000-character ids, 131,073 prompt token ids,
NaN and infinite floats, unknown enum values, empty required fields, huge counts), and those
bytes mutated (bit flips, truncation, garbage, random bytes, repeats, huge varints, wrong wire
types, deep groups, invalid UTF-8 in string fields).

Every status must be a documented one (never UNKNOWN or INTERNAL), no message a Python
exception's text, no service logs an unhandled error or counts INTERNAL/UNKNOWN in
switchboard_rpc_requests_total, every process is alive afterwards, the real replica is still
READY and a normal Generate through the gateway still succeeds. Run with -s for the histograms.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import struct
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from switchboard.common.channels import open_channel
from switchboard.common.pki import LocalCA
from switchboard.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    router_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

from .conftest import RunningStack, start_stack

pytestmark = pytest.mark.slow

SEED = 20_250_121
PER_SERVICE = 2_000
IN_FLIGHT = 16
TIMEOUT_S = 60.0  # generous: a slow shared machine must not turn into a failure
FUZZ_REPLICAS = 4  # generator/fuzz-<n> identities for Register, ReportLoad and Deregister
EXPERT = "bard-small"

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# Python's exception text: a traceback, a frame line, a class repr, or an exception constructor's
# repr. The generators never put these into the values they send (errors may echo values).
LEAK = re.compile(r"Traceback|File \"|Error\(|Exception\(|<class '")
WORDS = ("To", " be", ",", " or", " not", " that", " is", " the", " question", " whether", " tis", " nobler")
NASTY_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 1e-45, -1.0, 1e38, 1e300, -1e300)
U32_MAX, U64_MAX, I32_MIN, I32_MAX = 2**32 - 1, 2**64 - 1, -(2**31), 2**31 - 1


# -- protobuf wire format by hand (as in services/gateway/tests/test_fuzz.py) ------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_field(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One mutation of serialized bytes: (name, mutated bytes)."""
    kind = rng.choice(
        ["bitflip", "truncate", "append", "random", "repeat", "huge_varint", "wire_type", "deep_groups",
         "bad_utf8", "unknown_field", "splice", "fixed_bits"]
    )  # fmt: skip
    buf = bytearray(data)
    if kind == "bitflip":
        for _ in range(rng.randint(1, 6)):
            if buf:
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del buf[rng.randrange(len(buf) + 1) :]
    elif kind == "append":
        buf += rng.randbytes(rng.randint(1, 64))
    elif kind == "random":
        buf = bytearray(rng.randbytes(rng.choice([0, 1, 2, 3, 7, 16, 100, 1000, 10_000])))
    elif kind == "repeat":
        buf = bytearray(data * rng.randint(2, 20))  # proto merges repeated messages: often still valid
    elif kind == "huge_varint":
        choice = rng.randrange(4)
        if choice == 0:  # a length prefix far beyond the message
            buf += tag(rng.randint(1, 9), 2) + varint(rng.choice([2**31, 2**63, U64_MAX]))
        elif choice == 1:  # an overlong (11-byte) varint
            buf += tag(rng.randint(1, 9), 0) + b"\xff" * 10 + b"\x01"
        elif choice == 2:  # the largest field number
            buf += varint((2**29 - 1) << 3) + varint(1)
        else:  # field number 0
            buf = bytearray(b"\x00\x01") + buf
    elif kind == "wire_type":
        wire = rng.choice([0, 1, 2, 5, 3, 4, 6, 7])
        payload = {0: varint(rng.randrange(1 << 64)), 1: rng.randbytes(8), 2: varint(3) + b"abc", 5: rng.randbytes(4)}
        buf += tag(rng.randint(1, 15), wire) + payload.get(wire, b"")
    elif kind == "deep_groups":
        depth = rng.choice([50, 101, 1000, 20_000])
        buf += tag(99, 3) * depth + tag(99, 4) * depth
    elif kind == "bad_utf8":  # invalid UTF-8 in a (probably string) field
        buf += length_field(rng.randint(1, 11), rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"ok\xfe"]))
    elif kind == "unknown_field":
        buf += length_field(rng.randint(20, 5000), rng.randbytes(rng.randint(0, 50)))
    elif kind == "fixed_bits":  # NaN payloads and infinities as fixed32/fixed64 of any field
        if rng.random() < 0.5:
            buf += tag(rng.randint(1, 15), 5) + struct.pack("<I", rng.choice([0x7FC00001, 0x7F800000, 0xFF800000]))
        else:
            buf += tag(rng.randint(1, 15), 1) + struct.pack("<Q", rng.choice([0x7FF8000000000001, 0x7FF0000000000000]))
    else:  # splice: a random length-delimited field inside the message
        cut = rng.randrange(len(buf) + 1)
        buf[cut:cut] = length_field(rng.randint(1, 12), rng.randbytes(rng.randint(1, 20)))
    return kind, bytes(buf)


# -- values -----------------------------------------------------------------------------------------


def words(rng: random.Random, low: int = 1, high: int = 10) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def odd_string(rng: random.Random) -> str:
    return rng.choice(
        ["", " ", "x" * 10_000, "\x00", "\x00" * 50, "\U0010ffff" * 40, "\u202e\u200b", "../../etc/passwd",
         "%s%n{0}", "a\nb", "\U0001f600" * 300, "fuzz-" + "9" * 300, EXPERT.upper(), f" {EXPERT}"]
    )  # fmt: skip


def odd_u32(rng: random.Random) -> int:
    return rng.choice([0, 1, 255, 4096, 131_072, 131_073, 2**31, U32_MAX])


def odd_float(rng: random.Random) -> float:
    return rng.choice([*NASTY_FLOATS, 0.0, 1.0])


def sampling(rng: random.Random, absurd: bool) -> common_pb2.SamplingParams:
    # One or two tokens: a generation costs real CPU on the replica (0 would mean its default budget).
    params = common_pb2.SamplingParams(max_tokens=rng.choice([1, 1, 2]))
    if not absurd:
        if rng.random() < 0.3:
            params.temperature = rng.choice([0.0, 0.7, 1.0])
        return params
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["max_tokens", "temperature", "top_p", "top_k", "penalty", "stop", "seed", "min_tokens"])
        if kind == "max_tokens":
            params.max_tokens = rng.choice([-1, I32_MIN, I32_MAX, 513, 4097])
        elif kind == "temperature":
            params.temperature = odd_float(rng)
        elif kind == "top_p":
            params.top_p = odd_float(rng)
        elif kind == "top_k":
            params.top_k = rng.choice([-1, I32_MIN, I32_MAX])
        elif kind == "penalty":
            params.repetition_penalty = odd_float(rng)
        elif kind == "stop":
            params.stop.extend(rng.choice([[""], ["x"] * 10_000, ["y" * 10_000], ["\x00"], ["\U0001f600" * 100]]))
        elif kind == "seed":
            params.seed = rng.choice([0, U64_MAX, 2**63])
        else:
            params.min_tokens = rng.choice([-1, I32_MIN, I32_MAX, 3])
            params.ignore_eos = rng.random() < 0.5
    return params


def usage(rng: random.Random, absurd: bool) -> common_pb2.Usage:
    if not absurd:
        return common_pb2.Usage(prompt_tokens=rng.randint(1, 30), completion_tokens=rng.randint(0, 8))
    return common_pb2.Usage(prompt_tokens=odd_u32(rng), completion_tokens=odd_u32(rng), cached_prompt_tokens=odd_u32(rng))


def token_ids(rng: random.Random) -> list[int]:
    return rng.choice(
        [[], [U32_MAX], [4095, 4096], [0] * 131_073, list(range(131_072)), [rng.randrange(4096) for _ in range(600)]]
    )


def request_id(rng: random.Random, absurd: bool) -> str:
    return odd_string(rng) if absurd else f"fuzz-{rng.randrange(1 << 30)}"


# -- one builder per method: (rng, absurd, replica) -> message ---------------------------------------


def register(rng: random.Random, absurd: bool, replica: str) -> Message:
    message = scheduler_pb2.RegisterRequest(
        replica_id=replica,
        expert=EXPERT,
        address=f"127.0.0.1:{rng.randint(1, 9)}",
        device="cpu",
        model_name="fuzz",
        max_model_len=512,
        kv_block_size=16,
        load=scheduler_pb2.ReplicaLoad(kv_blocks_total=64),
    )
    if not absurd:
        return message
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(
            ["replica_id", "expert", "address", "strings", "max_model_len", "kv", "load", "events", "cost", "fingerprint"]
        )
        if kind == "replica_id":
            message.replica_id = rng.choice([odd_string(rng), "bard-small-0", ""])
        elif kind == "expert":
            message.expert = odd_string(rng)
        elif kind == "address":
            message.address = rng.choice(
                ["", "host", ":1", "127.0.0.1:0", "127.0.0.1:65536", "[::1:5", "::1:5", "a b:1", "h/x:1", "x" * 10_000 + ":1"]
            )
        elif kind == "strings":
            message.device, message.model_name = odd_string(rng), odd_string(rng)
        elif kind == "max_model_len":
            message.max_model_len = odd_u32(rng)
        elif kind == "kv":
            message.kv_block_size, message.kv_hash_seed = odd_u32(rng), rng.choice([0, U64_MAX])
        elif kind == "load":
            message.load.CopyFrom(load(rng))
        elif kind == "events":
            message.kv_events.CopyFrom(kv_events(rng))
        elif kind == "cost":
            message.cost_model.CopyFrom(scheduler_pb2.StepCostModel(**{f: odd_float(rng) for f in (
                "base_ms", "prefill_token_ms", "decode_seq_ms", "context_token_ms")}))  # fmt: skip
        else:
            message.tokenizer_fingerprint = odd_string(rng)
        message.max_waiting = rng.choice([0, U32_MAX])
    return message


def load(rng: random.Random) -> scheduler_pb2.ReplicaLoad:
    message = scheduler_pb2.ReplicaLoad(
        running=odd_u32(rng), waiting=odd_u32(rng), kv_blocks_used=odd_u32(rng), kv_blocks_total=odd_u32(rng),
        tokens_per_second=odd_float(rng),
    )  # fmt: skip
    if rng.random() < 0.2:
        message.cached_block_hashes.extend([U64_MAX] * rng.choice([1, 100_000]))
    return message


def kv_events(rng: random.Random) -> scheduler_pb2.KvEvents:
    events = scheduler_pb2.KvEvents(reset=rng.random() < 0.3)
    count = rng.choice([0, 1, 3, 300])
    for _ in range(count):
        stored = rng.choice([[], [1, 2, 3], [U64_MAX] * 50])
        if count <= 3 and rng.random() < 0.3:
            stored = list(range(20_000))
        events.events.add(
            sequence=rng.choice([0, 1, 2, U64_MAX, rng.randrange(1 << 64)]),
            stored_block_hashes=stored,
            evicted_block_hashes=rng.choice([[], [1], [U64_MAX] * 50]),
            cleared=rng.random() < 0.1,
        )
    return events


def report_load(rng: random.Random, absurd: bool, replica: str) -> Message:
    message = scheduler_pb2.ReportLoadRequest(replica_id=replica, load=scheduler_pb2.ReplicaLoad(kv_blocks_total=64))
    if absurd:
        if rng.random() < 0.2:
            message.replica_id = rng.choice([odd_string(rng), "bard-small-0"])
        message.load.CopyFrom(load(rng))
        message.draining = rng.random() < 0.2
        if rng.random() < 0.6:
            message.kv_events.CopyFrom(kv_events(rng))
    return message


def deregister(rng: random.Random, absurd: bool, replica: str) -> Message:
    return scheduler_pb2.DeregisterRequest(
        replica_id=rng.choice([odd_string(rng), "bard-small-0", replica]) if absurd else replica
    )


def place(rng: random.Random, absurd: bool, replica: str) -> Message:
    message = scheduler_pb2.PlaceRequest(
        request_id=request_id(rng, False), experts=[EXPERT], prompt_tokens=rng.randint(1, 40), max_tokens=rng.randint(1, 8)
    )
    if not absurd:
        if rng.random() < 0.3:
            message.exclude_replica_ids.append(rng.choice(["bard-small-0", replica]))
        return message
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["request_id", "counts", "exclude", "experts", "tokens", "fingerprint", "priority", "legacy"])
        if kind == "request_id":
            message.request_id = odd_string(rng)
        elif kind == "counts":
            message.prompt_tokens, message.max_tokens = odd_u32(rng), odd_u32(rng)
            message.max_alternates, message.min_model_len = odd_u32(rng), odd_u32(rng)
        elif kind == "exclude":
            message.exclude_replica_ids.extend(rng.choice([[""], ["x"] * 10_000, [odd_string(rng)], ["bard-small-0"]]))
        elif kind == "experts":
            del message.experts[:]
            message.experts.extend(rng.choice([[], [""], [odd_string(rng)], [EXPERT] * 10_000, ["no-such", EXPERT]]))
        elif kind == "tokens":
            message.prompt_token_ids.extend(token_ids(rng))
        elif kind == "fingerprint":
            message.tokenizer_fingerprint = odd_string(rng)
        elif kind == "priority":
            message.priority = rng.choice([-1, 4, 99, I32_MAX])  # unknown values of an open enum
        else:
            message.expert = odd_string(rng)
    return message


def scheduler_complete(rng: random.Random, absurd: bool, replica: str) -> Message:
    message = scheduler_pb2.SchedulerCompleteRequest(
        request_id=request_id(rng, False), replica_id="bard-small-0", success=rng.random() < 0.8,
        finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=usage(rng, False),
        time_to_first_token_seconds=0.01, latency_seconds=0.05,
    )  # fmt: skip
    if absurd:
        message.request_id = request_id(rng, rng.random() < 0.5)
        message.replica_id = rng.choice([odd_string(rng), replica, "bard-small-0"])
        message.finish_reason = rng.choice([-1, 6, 99, I32_MAX, 5])
        message.usage.CopyFrom(usage(rng, True))
        message.time_to_first_token_seconds, message.latency_seconds = odd_float(rng), odd_float(rng)
    return message


def get_cluster(rng: random.Random, absurd: bool, replica: str) -> Message:
    return scheduler_pb2.GetClusterRequest()


def route(rng: random.Random, absurd: bool, replica: str) -> Message:
    message = router_pb2.RouteRequest(request_id=request_id(rng, False), prompt=words(rng), sampling=sampling(rng, False))
    if rng.random() < 0.3:
        message.expert = rng.choice(["", EXPERT])
    if not absurd:
        return message
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(
            ["request_id", "prompt", "sampling", "expert", "tenant", "exclude", "cost", "priority", "allowed"]
        )
        if kind == "request_id":
            message.request_id = odd_string(rng)
        elif kind == "prompt":
            message.prompt = rng.choice(["", odd_string(rng), "b" * rng.choice([2_001, 40_000, 200_000]), words(rng, 400, 600)])
        elif kind == "sampling":
            message.sampling.CopyFrom(sampling(rng, True))
        elif kind == "expert":
            message.expert = odd_string(rng)
        elif kind == "tenant":
            message.tenant = odd_string(rng)
        elif kind == "exclude":
            message.exclude_replica_ids.extend(rng.choice([[""], ["x"] * 10_000, ["bard-small-0"], [odd_string(rng)]]))
        elif kind == "cost":
            message.cost_weight = rng.choice([*NASTY_FLOATS, 100.0001, 1e308])
        elif kind == "priority":
            message.priority = rng.choice([-1, 4, 99, I32_MAX])
        else:
            message.allowed_experts.extend(rng.choice([[""], ["no-such"], [EXPERT] * 10_000, [odd_string(rng)]]))
    return message


def feedback(rng: random.Random, absurd: bool, replica: str) -> Message:
    message = router_pb2.FeedbackRequest(
        request_id=request_id(rng, False), expert=EXPERT, replica_id="bard-small-0", success=True,
        finish_reason=common_pb2.FINISH_REASON_EOS, usage=usage(rng, False),
        time_to_first_token_seconds=0.02, latency_seconds=0.1,
    )  # fmt: skip
    if absurd:
        message.request_id = request_id(rng, rng.random() < 0.6)
        message.expert = rng.choice([odd_string(rng), EXPERT])
        message.replica_id = rng.choice([odd_string(rng), replica])
        message.success = rng.random() < 0.5
        message.finish_reason = rng.choice([-1, 6, 99, I32_MAX])
        message.usage.CopyFrom(usage(rng, True))
        message.time_to_first_token_seconds, message.latency_seconds = odd_float(rng), odd_float(rng)
    return message


def list_experts(rng: random.Random, absurd: bool, replica: str) -> Message:
    return router_pb2.ListExpertsRequest()


def generate(rng: random.Random, absurd: bool, replica: str) -> Message:
    message = generator_pb2.GeneratorGenerateRequest(
        request_id=request_id(rng, False), prompt=words(rng), sampling=sampling(rng, False)
    )
    if not absurd:
        if rng.random() < 0.3:
            message.prompt = ""
            message.prompt_token_ids.extend(rng.randrange(4096) for _ in range(rng.randint(1, 20)))
        return message
    for _ in range(rng.randint(1, 2)):
        kind = rng.choice(["request_id", "prompt", "tokens", "sampling", "fingerprint", "empty"])
        if kind == "request_id":
            message.request_id = odd_string(rng)
        elif kind == "prompt":
            message.prompt = rng.choice([odd_string(rng), "b" * rng.choice([513, 40_000, 200_000]), words(rng, 400, 600)])
        elif kind == "tokens":
            message.prompt_token_ids.extend(token_ids(rng))
        elif kind == "sampling":
            message.sampling.CopyFrom(sampling(rng, True))
        elif kind == "fingerprint":
            message.tokenizer_fingerprint = odd_string(rng)
        else:
            message.prompt = ""
            del message.prompt_token_ids[:]
    if message.sampling.max_tokens > 3:
        # A long generation costs seconds of the replica's CPU: keep huge budgets, but only beside a
        # prompt longer than the context (512 tokens), which the replica must refuse before it runs.
        message.prompt = ""
        message.prompt_token_ids[:] = [rng.randrange(4096) for _ in range(600)]
    return message


def info(rng: random.Random, absurd: bool, replica: str) -> Message:
    return generator_pb2.InfoRequest()


def score(rng: random.Random, absurd: bool, replica: str) -> Message:
    message = generator_pb2.ScoreRequest(texts=[words(rng, 2, 12) for _ in range(rng.randint(1, 3))])
    if absurd:
        kind = rng.choice(["none", "many", "short", "long", "odd"])
        if kind == "none":
            del message.texts[:]
        elif kind == "many":
            message.texts[:] = ["to be"] * rng.choice([65, 1000])
        elif kind == "short":
            message.texts.append(rng.choice(["", "a"]))
        elif kind == "long":
            message.texts.append("thou " * 2000)  # far past the 512-token context: refused before the model runs
        else:
            message.texts.append(odd_string(rng))
    return message


def rollout_spec(rng: random.Random, absurd: bool) -> scheduler_pb2.RolloutSpec:
    spec = scheduler_pb2.RolloutSpec(
        expert=EXPERT,
        from_revision=rng.choice(["", "v1", "fuzz"]),
        to_revision=rng.choice(["v2", "fuzz", "sha-000000000000"]),
        steps=[scheduler_pb2.RolloutStep(weight=rng.choice([0.1, 0.5, 1.0]), duration_seconds=rng.choice([1.0, 60.0]))],
    )
    if not absurd:
        return spec
    kind = rng.choice(["expert", "labels", "steps", "gates", "strategy", "probe", "deploy"])
    if kind == "expert":
        spec.expert = rng.choice(["", odd_string(rng)])
    elif kind == "labels":
        spec.from_revision, spec.to_revision = odd_string(rng), odd_string(rng)
    elif kind == "steps":
        spec.steps.extend(
            scheduler_pb2.RolloutStep(weight=odd_float(rng), duration_seconds=odd_float(rng)) for _ in range(rng.choice([1, 40]))
        )
    elif kind == "gates":
        spec.gates.CopyFrom(
            scheduler_pb2.RolloutGates(
                max_error_ratio=odd_float(rng), max_ttft_p95_ratio=odd_float(rng), min_requests=odd_u32(rng)
            )
        )
    elif kind == "strategy":
        spec.strategy = rng.choice([2, 3, 99])
    elif kind == "probe":
        spec.quality_probe.texts[:] = rng.choice([[], [""], ["x"] * 65, [odd_string(rng)]])
        spec.quality_probe.max_nll_increase = odd_float(rng)
    else:
        spec.deploy.CopyFrom(scheduler_pb2.RolloutDeploy(model=odd_string(rng), replicas=odd_u32(rng)))
    return spec


def start_rollout(rng: random.Random, absurd: bool, replica: str) -> Message:
    return scheduler_pb2.StartRolloutRequest(spec=rollout_spec(rng, absurd))


def get_rollout(rng: random.Random, absurd: bool, replica: str) -> Message:
    return scheduler_pb2.GetRolloutRequest(expert=odd_string(rng) if absurd else EXPERT)


def list_rollouts(rng: random.Random, absurd: bool, replica: str) -> Message:
    return scheduler_pb2.ListRolloutsRequest()


def rollout_action(kind: type[Message]) -> Builder:
    """A builder of PauseRolloutRequest, ResumeRolloutRequest or AbortRolloutRequest (the same fields)."""

    def build(rng: random.Random, absurd: bool, replica: str) -> Message:
        message = kind(expert=EXPERT, reason=words(rng, 0, 4))
        if absurd:
            message.expert, message.reason = rng.choice([("", ""), (odd_string(rng), ""), (EXPERT, "x" * 5000)])
        return message

    return build


Builder = Callable[[random.Random, bool, str], Message]


@dataclass(frozen=True)
class Method:
    service: str  # scheduler, router, generator
    path: str
    build: Builder
    identity: str  # the allowed identity ("fuzz": one of the generator/fuzz-<n>)
    weight: int
    streaming: bool = False


METHODS = [
    Method("scheduler", "/switchboard.v1.Scheduler/Register", register, "fuzz", 5),
    Method("scheduler", "/switchboard.v1.Scheduler/ReportLoad", report_load, "fuzz", 5),
    Method("scheduler", "/switchboard.v1.Scheduler/Deregister", deregister, "fuzz", 2),
    Method("scheduler", "/switchboard.v1.Scheduler/Place", place, "router", 6),
    Method("scheduler", "/switchboard.v1.Scheduler/Complete", scheduler_complete, "router", 4),
    Method("scheduler", "/switchboard.v1.Scheduler/GetCluster", get_cluster, "operator", 1),
    Method("router", "/switchboard.v1.Router/Route", route, "gateway", 6),
    Method("router", "/switchboard.v1.Router/Feedback", feedback, "gateway", 4),
    Method("router", "/switchboard.v1.Router/ListExperts", list_experts, "gateway", 1),
    Method("generator", "/switchboard.v1.Generator/Generate", generate, "gateway", 2, streaming=True),
    Method("generator", "/switchboard.v1.Generator/Info", info, "operator", 3),
    Method("generator", "/switchboard.v1.Generator/Score", score, "operator", 1),
    Method("scheduler", "/switchboard.v1.Scheduler/StartRollout", start_rollout, "operator", 2),
    Method("scheduler", "/switchboard.v1.Scheduler/GetRollout", get_rollout, "operator", 1),
    Method("scheduler", "/switchboard.v1.Scheduler/ListRollouts", list_rollouts, "operator", 1),
    Method("scheduler", "/switchboard.v1.Scheduler/PauseRollout", rollout_action(scheduler_pb2.PauseRolloutRequest), "operator", 1),
    Method("scheduler", "/switchboard.v1.Scheduler/ResumeRollout", rollout_action(scheduler_pb2.ResumeRolloutRequest), "operator", 1),
    Method("scheduler", "/switchboard.v1.Scheduler/AbortRollout", rollout_action(scheduler_pb2.AbortRolloutRequest), "operator", 1),
]
# An identity each method's policy refuses (PERMISSION_DENIED before the handler).
REFUSED = {"scheduler": "gateway", "router": "operator", "generator": "router"}


@dataclass
class Case:
    method: Method
    label: str
    identity: str
    payload: bytes

    def repro(self) -> str:
        shown = self.payload[:120]
        more = "..." if len(self.payload) > 120 else ""
        return f"{self.method.path} as {self.identity}: {shown!r}{more} ({len(self.payload)} B)"


def make_case(rng: random.Random, method: Method) -> Case:
    fuzz_index = rng.randrange(FUZZ_REPLICAS)
    identity = f"fuzz-{fuzz_index}" if method.identity == "fuzz" else method.identity
    if rng.random() < 0.03:
        identity = REFUSED[method.service]
    roll = rng.random()
    absurd = roll >= 0.2 and roll < 0.6
    payload = method.build(rng, absurd, f"fuzz-{fuzz_index}").SerializeToString()
    label = "absurd" if absurd else "valid"
    if roll >= 0.6:
        kind, payload = mutate(rng, payload)
        label = f"mutated.{kind}"
    return Case(method, label, identity, payload)


# -- sending and judging ----------------------------------------------------------------------------


@dataclass
class Results:
    by_service: dict[str, Counter[str]] = field(default_factory=dict)
    by_method: dict[str, Counter[str]] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)
    seconds: Counter[str] = field(default_factory=Counter)  # summed call time by method (shown, never judged)

    def record(self, case: Case, code: grpc.StatusCode, problem: str | None, seconds: float) -> None:
        self.seconds[case.method.path.rsplit(".", 1)[-1]] += seconds
        self.by_service.setdefault(case.method.service, Counter())[code.name] += 1
        self.by_method.setdefault(case.method.path.rsplit(".", 1)[-1], Counter())[code.name] += 1
        if problem is not None:
            self.violations.append((f"[{case.method.path} {case.label}] {code.name}: {problem[:160]}", case.repro()))

    def summary(self) -> str:
        groups: dict[str, list[str]] = {}
        for kind, repro in self.violations:
            groups.setdefault(kind, []).append(repro)
        return "\n".join(f"{len(r)} x {kind}\n    e.g. {min(r, key=len)}" for kind, r in sorted(groups.items()))

    def print(self, seconds: float) -> None:
        total = sum(sum(c.values()) for c in self.by_service.values())
        print(f"\nfuzz: {total} requests in {seconds:.1f} s")
        for service in sorted(self.by_service):
            counts = ", ".join(f"{code} {n}" for code, n in self.by_service[service].most_common())
            print(f"  {service:<10} {counts}")
        for method in sorted(self.by_method):
            counts = ", ".join(f"{code} {n}" for code, n in self.by_method[method].most_common())
            print(f"    {method:<20} {self.seconds[method]:7.1f} s  {counts}")


async def send(channels: dict[tuple[str, str], grpc.aio.Channel], case: Case, results: Results) -> None:
    channel = channels[(case.method.service, case.identity)]
    code, details = grpc.StatusCode.OK, ""
    started = time.monotonic()
    try:
        if case.method.streaming:
            stream = channel.unary_stream(case.method.path, request_serializer=None, response_deserializer=None)
            async for _ in stream(case.payload, timeout=TIMEOUT_S):
                pass
        else:
            unary = channel.unary_unary(case.method.path, request_serializer=None, response_deserializer=None)
            await unary(case.payload, timeout=TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        code, details = error.code(), error.details() or ""
    problem = None
    if code not in ALLOWED:
        problem = f"undocumented status: {details[:300]!r}"
    elif code != grpc.StatusCode.OK:
        found = LEAK.search(details)
        if found is not None:
            problem = f"message leaks exception text {found.group(0)!r}: {details[:300]!r}"
        elif not details:
            problem = "an error without a message"
    results.record(case, code, problem, time.monotonic() - started)


def metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def internal_counts(ports: dict[str, int]) -> dict[str, str]:
    """Each service's switchboard_rpc_requests_total samples with code INTERNAL or UNKNOWN."""
    pattern = re.compile(r'^switchboard_rpc_requests_total\{([^}]*code="(?:INTERNAL|UNKNOWN)"[^}]*)\} (\S+)$', re.M)
    return {
        service: ", ".join(f"{labels}={value}" for labels, value in pattern.findall(metrics_text(port)))
        for service, port in ports.items()
    }


def unhandled_lines(log_dir: Path) -> list[str]:
    return [
        f"{path.name}: {line[:300]}"
        for path in sorted(log_dir.glob("*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if "unhandled error" in line or "Traceback" in line
    ]


@pytest.fixture
def stack(tmp_path: Path, model_dir: Path) -> Iterator[RunningStack]:
    running = start_stack(tmp_path, model_dir, {EXPERT: 1})
    try:
        yield running
    finally:
        running.stack.stop()


def cluster(running: RunningStack) -> dict[str, scheduler_pb2.Replica]:
    plan = running.stack.plan
    with plan.channel(plan.scheduler_addr, "scheduler") as channel:
        reply = scheduler_pb2_grpc.SchedulerStub(channel).GetCluster(scheduler_pb2.GetClusterRequest(), timeout=10)
    return {r.replica_id: r for r in reply.replicas}


async def test_every_service_survives_a_storm_of_hostile_requests(stack: RunningStack) -> None:
    plan = stack.stack.plan
    (generator,) = plan.generators
    ca = LocalCA(plan.identities["operator"].ca_file.parent)
    identities = {name: plan.identities[name] for name in ("router", "gateway", "operator")}
    identities.update({f"fuzz-{n}": ca.issue(f"generator/fuzz-{n}") for n in range(FUZZ_REPLICAS)})
    addresses = {
        "scheduler": plan.scheduler_addr,
        "router": plan.router_addr,
        "generator": f"127.0.0.1:{generator.port}",
    }
    metrics_ports = {
        "scheduler": plan.scheduler_metrics,
        "router": plan.router_metrics,
        "generator": generator.metrics_port,
    }
    channels = {
        (service, name): open_channel(address, identity, peer_role=service)
        for service, address in addresses.items()
        for name, identity in identities.items()
    }

    rng = random.Random(SEED)
    cases: list[Case] = []
    for service in addresses:
        methods = [m for m in METHODS if m.service == service]
        cases += [make_case(rng, m) for m in rng.choices(methods, [m.weight for m in methods], k=PER_SERVICE)]
    rng.shuffle(cases)
    results = Results()
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(case: Case) -> None:
        async with gate:
            await send(channels, case, results)

    try:
        internal_before = internal_counts(metrics_ports)
        started = time.monotonic()
        await asyncio.gather(*(one(case) for case in cases))
        results.print(time.monotonic() - started)
        internal_after = internal_counts(metrics_ports)

        # Take the fuzz replicas out again, so the normal request below meets only the real one.
        for n in range(FUZZ_REPLICAS):
            deregister_call = channels[("scheduler", f"fuzz-{n}")].unary_unary(
                "/switchboard.v1.Scheduler/Deregister", request_serializer=None, response_deserializer=None
            )
            await deregister_call(
                scheduler_pb2.DeregisterRequest(replica_id=f"fuzz-{n}").SerializeToString(), timeout=TIMEOUT_S
            )
    finally:
        for channel in channels.values():
            await channel.close()

    for service in addresses:
        assert sum(results.by_service[service].values()) >= 2_000
    assert not results.violations, f"{len(results.violations)} bad answers:\n" + results.summary()
    assert internal_after == internal_before
    assert not unhandled_lines(stack.log_dir), unhandled_lines(stack.log_dir)[:5]
    assert not list(stack.stack.group.dead())

    # The real replica is still READY and a normal request still works end to end.
    replicas = cluster(stack)
    assert replicas[generator.replica_id].state == scheduler_pb2.REPLICA_STATE_READY
    assert not [r for r in replicas if r.startswith("fuzz-")]
    with grpc.insecure_channel(stack.gateway_addr) as channel:
        responses = list(
            gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GenerateRequest(prompt="Now is the winter", sampling=common_pb2.SamplingParams(max_tokens=4)),
                metadata=stack.auth(),
                timeout=TIMEOUT_S,
            )
        )
    assert responses and responses[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
