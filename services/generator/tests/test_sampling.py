"""SamplingParams validation and the batched Sampler against Hugging Face's logits processors."""

from __future__ import annotations

import math

import pytest
import torch
from switchboard.generator.sampling import Sampler, SamplingParams, make_generator
from switchboard.v1 import common_pb2
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 50


def hf_process(logits: torch.Tensor, p: SamplingParams, previous: list[int]) -> torch.Tensor:
    """Reference: the processors transformers' generate() builds for these params, in its order."""
    chain = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature not in (0.0, 1.0):
        chain.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        chain.append(TopPLogitsWarper(p.top_p))
    ids = torch.tensor([previous or [0]])
    return chain(ids, logits[None].clone())[0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(top_p=0.8),
        SamplingParams(temperature=0.5, top_k=10, top_p=0.9),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(temperature=1.1, top_k=7, top_p=0.6, repetition_penalty=1.3),
        SamplingParams(top_k=VOCAB + 10),
    ],
)
def test_processing_matches_transformers(params: SamplingParams) -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB) * 3
    previous = [[1, 2, 3, 3], [10, 11], [], [5, 49, 0]]
    ours = Sampler().process_logits(logits, [params] * 4, previous)
    for row in range(4):
        ref = (
            hf_process(logits[row], params, previous[row])
            if previous[row]
            else hf_process(logits[row], SamplingParams(**{**params.__dict__, "repetition_penalty": 1.0}), [])
        )
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(ref)), row
        finite = ~torch.isinf(ref)
        torch.testing.assert_close(ours[row][finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_mixed_batch_processes_each_row_with_its_own_params() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    params = [
        SamplingParams(top_k=3),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.5, temperature=0.8),
    ]
    ours = Sampler().process_logits(logits, params, [[1], [1], [1]])
    assert (~torch.isinf(ours[0])).sum() == 3
    torch.testing.assert_close(ours[1], logits[1])  # greedy row untouched
    torch.testing.assert_close(ours[2], hf_process(logits[2], params[2], [1]))


def test_greedy_is_argmax_after_repetition_penalty() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 2.0
    logits[:, 8] = 1.5
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    tokens = Sampler().sample(logits, params, [None, None], [[7], [7]])
    assert tokens.tolist() == [7, 8]  # 2.0/2 = 1.0 < 1.5


def test_samples_only_tokens_that_survive_truncation() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, VOCAB) * 4
    p = SamplingParams(top_k=4, top_p=0.9)
    allowed = set(torch.nonzero(~torch.isinf(hf_process(logits[0], p, []))).flatten().tolist())
    gen = make_generator(123)
    seen = {int(Sampler().sample(logits, [p], [gen], [[]])[0]) for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_sampling_frequencies_follow_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * 7]))
    sampler, gen = Sampler(), make_generator(7)
    draws = 4000
    counts = torch.bincount(
        torch.cat([sampler.sample(logits, [SamplingParams()], [gen], [[]]) for _ in range(draws)]),
        minlength=10,
    )
    freq = counts[:3].float() / draws
    # 4000 draws: the standard error of each frequency is below 0.008; 0.04 is five of them.
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04), freq


def test_seed_gives_the_same_tokens_whatever_the_batch() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, VOCAB)
    p = SamplingParams(temperature=1.0, seed=42)
    sampler = Sampler()
    g_alone = make_generator(42)
    alone = [int(sampler.sample(logits[1:2], [p], [g_alone], [[]])[0]) for _ in range(20)]
    g_req, g_other1, g_other2 = make_generator(42), make_generator(1), make_generator(2)
    batch_params = [SamplingParams(seed=1), p, SamplingParams(seed=2, top_k=3)]
    batched = [
        int(sampler.sample(logits, batch_params, [g_other1, g_req, g_other2], [[], [], []])[1])
        for _ in range(20)
    ]
    assert alone == batched
    g_diff = make_generator(43)
    different_seed = [int(sampler.sample(logits[1:2], [p], [g_diff], [[]])[0]) for _ in range(20)]
    assert different_seed != alone


def test_min_tokens_and_ignore_eos_mask_eos() -> None:
    logits = torch.full((3, VOCAB), -5.0)
    logits[:, 0] = 10.0  # eos dominates
    sampler = Sampler(eos_token_ids=[0])
    params = [
        SamplingParams(temperature=0.0, min_tokens=3),
        SamplingParams(temperature=0.0, min_tokens=3),
        SamplingParams(temperature=0.0, ignore_eos=True),
    ]
    tokens = sampler.sample(logits, params, [None] * 3, [[], [], []], num_generated=[2, 3, 100])
    assert tokens[0] != 0 and tokens[1] == 0 and tokens[2] != 0


def test_sampled_row_without_generator_is_an_error() -> None:
    with pytest.raises(ValueError, match="no generator"):
        Sampler().sample(torch.randn(1, VOCAB), [SamplingParams()], [None], [[]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 3.5}, "sampling.temperature: must be in [0, 2], got 3.5"),
        ({"temperature": math.nan}, "sampling.temperature:"),
        ({"top_p": 0.0}, "sampling.top_p: must be in (0, 1]"),
        ({"top_p": 1.5}, "sampling.top_p:"),
        ({"top_k": -1}, "sampling.top_k:"),
        ({"repetition_penalty": 0.5}, "sampling.repetition_penalty: must be in [1, 2]"),
        ({"max_tokens": 0}, "sampling.max_tokens:"),
        ({"stop": ("",)}, "sampling.stop:"),
        ({"stop": tuple(str(i) for i in range(9))}, "sampling.stop: at most 8"),
        ({"stop": ("x" * 65,)}, "sampling.stop: each stop string must be at most 64"),
        ({"min_tokens": 20, "max_tokens": 10}, "sampling.min_tokens: must be <= max_tokens (10)"),
        ({"seed": -1}, "sampling.seed:"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(message)


def test_from_proto_defaults_and_values() -> None:
    empty = SamplingParams.from_proto(common_pb2.SamplingParams(), default_max_tokens=32)
    assert empty == SamplingParams(max_tokens=32)
    msg = common_pb2.SamplingParams(
        max_tokens=5,
        temperature=0.0,
        top_p=0.5,
        top_k=3,
        repetition_penalty=1.25,
        stop=["\n\n", "END"],
        seed=2**64 - 1,
        min_tokens=2,
        ignore_eos=True,
    )
    p = SamplingParams.from_proto(msg, default_max_tokens=32)
    assert p == SamplingParams(
        max_tokens=5,
        temperature=0.0,
        top_p=0.5,
        top_k=3,
        repetition_penalty=1.25,
        stop=("\n\n", "END"),
        seed=2**64 - 1,
        min_tokens=2,
        ignore_eos=True,
    )
    assert p.greedy
    make_generator(p.seed)  # the full uint64 range seeds a generator


def test_from_proto_rejects_bad_fields() -> None:
    with pytest.raises(
        ValueError, match=r"^sampling\.max_tokens: must be at least 1 \(0 means the default\), got -1"
    ):
        SamplingParams.from_proto(common_pb2.SamplingParams(max_tokens=-1), 16)
    with pytest.raises(ValueError, match=r"^sampling\.temperature: must be in \[0, 2\], got 3\.5"):
        SamplingParams.from_proto(common_pb2.SamplingParams(temperature=3.5), 16)
    with pytest.raises(ValueError, match=r"^sampling\.min_tokens"):
        SamplingParams.from_proto(common_pb2.SamplingParams(min_tokens=17), 16)
