"""Engine correctness against Hugging Face transformers, plus scheduling, caching and streaming behaviour.

Tiny random Llama (grouped-query) and GPT-2 checkpoints are built with
`transformers` at test time; the engine loads the saved folders with the real
loader and must reproduce the reference's logits and greedy continuations.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import build_gpt2, build_llama
from switchboard.generator.engine import (
    Engine,
    EngineConfig,
    EngineOutput,
    EngineRequest,
    QueueFull,
    RequestRejected,
)
from switchboard.generator.engine.attention import AttentionContext, SequenceSlice
from switchboard.generator.engine.kv_cache import KVCache, prompt_block_hashes
from switchboard.generator.engine.output import OutputState
from switchboard.generator.loader import LoadedModel, load_model
from switchboard.generator.sampling import SamplingParams

PROMPTS = [
    "To be, or not to be",
    "The quick brown fox jumps over the lazy dog again and again, whether 'tis nobler",
    "Of",
    "Café naïve façade, déjà vu and the fruit of that forbidden tree, the slings and arrows of it all",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random grouped-query Llama."""
    return build_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random GPT-2."""
    return build_gpt2(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


@pytest.fixture(scope="module")
def llama(llama_dir: Path) -> LoadedModel:
    """The tiny Llama loaded by our loader in float32."""
    return load_model(llama_dir, "cpu", "float32")


@pytest.fixture(scope="module")
def llama_ref(llama_dir: Path) -> Any:
    """The same checkpoint in transformers (the reference)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(llama_dir).eval()


@pytest.fixture(scope="module")
def gpt2(gpt2_dir: Path) -> LoadedModel:
    """The tiny GPT-2 loaded by our loader in float32."""
    return load_model(gpt2_dir, "cpu", "float32")


@pytest.fixture(scope="module")
def gpt2_ref(gpt2_dir: Path) -> Any:
    """The same GPT-2 checkpoint in transformers."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


def reference_greedy(ref: Any, ids: list[int], n: int, banned: Collection[int] = ()) -> list[int]:
    """Greedy continuation of `ids` by full re-computation with the reference model, never choosing
    `banned` (the EOS ids, to match an engine request with ignore_eos)."""
    out = list(ids)
    banned = list(banned)
    with torch.inference_mode():
        for _ in range(n):
            logits = ref(torch.tensor([out])).logits[0, -1]
            if banned:
                logits[banned] = -float("inf")
            out.append(int(logits.argmax()))
    return out[len(ids) :]


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    """Greedy parameters that ignore EOS (random models emit it at random)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def collect(engine: Engine, request: EngineRequest) -> tuple[list[int], str, EngineOutput]:
    """All token ids and text of one request, and its last output."""
    ids: list[int] = []
    text = ""
    last: EngineOutput | None = None
    async for out in engine.generate(request):
        ids += out.token_ids
        text += out.text
        last = out
    assert last is not None
    return ids, text, last


def blocks_needed(loaded: LoadedModel, prompt: str, max_tokens: int, block_size: int = 4) -> int:
    """KV blocks one request needs at its longest."""
    return (len(loaded.tokenizer.encode(prompt)) + max_tokens - 1 + block_size - 1) // block_size


async def running_engine(loaded: LoadedModel, **config: Any) -> Engine:
    """A started engine with a small block size (many block boundaries in short prompts)."""
    config.setdefault("block_size", 4)
    config.setdefault("num_blocks", 128)
    engine = Engine(loaded, EngineConfig(**config))
    await engine.start()
    return engine


# ---------------------------------------------------------------- logits vs reference


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_paged_step_logits_match_reference(family: str, request: pytest.FixtureRequest) -> None:
    """Mixed steps (prefills of varied length, chunk continuations over a cached prefix, batched decodes)
    give the reference logits at every position."""
    loaded: LoadedModel = request.getfixturevalue(family)
    ref = request.getfixturevalue(f"{family}_ref")
    model = loaded.model
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = (getattr(cfg, "hidden_size", None) or cfg.n_embd) // heads
    bs = 4
    cache = KVCache(layers, 64, bs, kv_heads, head_dim, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 300, (n,), generator=gen) for n in (13, 6, 9)]
    tables = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    with torch.inference_mode():
        expected = [ref(s[None]).logits[0] for s in seqs]
        done = [0, 0, 0]

        def run(chunks: list[tuple[int, int]]) -> None:
            # chunks: (sequence, tokens); single-token ones must come first.
            ids, pos, slices, rows = [], [], [], []
            for s, n in chunks:
                start = done[s]
                ids.append(seqs[s][start : start + n])
                pos.append(torch.arange(start, start + n))
                slices.append(SequenceSlice(tables[s], start, n))
                rows.extend(range(sum(len(x) for x in ids) - n, sum(len(x) for x in ids)))
            attn = AttentionContext(cache, slices, torch.device("cpu"))
            logits = model.forward_step(torch.cat(ids), torch.cat(pos), attn, torch.tensor(rows))
            at = 0
            for s, n in chunks:
                want = expected[s][done[s] : done[s] + n]
                torch.testing.assert_close(logits[at : at + n], want, atol=1e-4, rtol=1e-4)
                at += n
                done[s] += n

        run([(0, 7), (1, 6)])  # two fresh prefills of different length
        run([(0, 5), (2, 4)])  # a continuation over a cached prefix next to a fresh prefill
        run([(0, 1), (2, 1)])  # batched decodes with different context lengths
        run([(2, 1)])  # a decode alone
        run([(2, 3)])  # the last chunk of a prompt over a cached prefix
        assert done == [13, 6, 9]


# ---------------------------------------------------------------- greedy vs reference


@pytest.mark.parametrize("family", ["llama", "gpt2"])
async def test_greedy_single_sequence_matches_reference(family: str, request: pytest.FixtureRequest) -> None:
    """One sequence at a time: the engine's greedy tokens equal the reference's."""
    loaded: LoadedModel = request.getfixturevalue(family)
    ref = request.getfixturevalue(f"{family}_ref")
    engine = await running_engine(loaded, enable_prefix_caching=False)
    try:
        for i, prompt in enumerate(PROMPTS[:3]):
            ids = loaded.tokenizer.encode(prompt)
            got, _, last = await collect(engine, EngineRequest(f"s{i}", prompt=prompt, sampling=greedy(12)))
            assert got == reference_greedy(ref, ids, 12)
            assert last.finish_reason == "length"
            assert last.usage is not None and last.usage.completion_tokens == 12
            assert last.usage.prompt_tokens == len(ids)
    finally:
        await engine.stop()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("step_in_thread", [None, True])
async def test_greedy_batched_matches_reference(
    family: str, prefix_caching: bool, step_in_thread: bool | None, request: pytest.FixtureRequest
) -> None:
    """Sequences of different lengths batched together (small token budget: chunked prefill) equal
    the reference one by one, with steps on the loop's thread (the CPU default) or a worker thread."""
    loaded: LoadedModel = request.getfixturevalue(family)
    ref = request.getfixturevalue(f"{family}_ref")
    engine = await running_engine(
        loaded, enable_prefix_caching=prefix_caching, max_tokens_per_step=10, step_in_thread=step_in_thread
    )
    assert (engine._executor is not None) == bool(step_in_thread)
    try:
        prompts = [*PROMPTS, PROMPTS[1] + " and more"]  # the last shares a long prefix with PROMPTS[1]
        results = await asyncio.gather(
            *(collect(engine, EngineRequest(f"b{i}", prompt=p, sampling=greedy(10))) for i, p in enumerate(prompts))
        )
        for prompt, (got, _, _) in zip(prompts, results, strict=True):
            assert got == reference_greedy(ref, loaded.tokenizer.encode(prompt), 10)
        assert engine.pool.num_used == 0
    finally:
        await engine.stop()


async def test_prefix_reuse_serves_cached_blocks_and_keeps_outputs(llama: LoadedModel, llama_ref: Any) -> None:
    """A second request with the same prompt prefix reuses the cached blocks; outputs are unchanged."""
    engine = await running_engine(llama)
    try:
        shared = PROMPTS[3]
        first_ids = llama.tokenizer.encode(shared)
        got1, _, last1 = await collect(engine, EngineRequest("p1", prompt=shared, sampling=greedy(6)))
        assert last1.usage is not None and last1.usage.cached_prompt_tokens == 0
        cached = engine.kv_events.cached()
        hashes = prompt_block_hashes(first_ids, 4)
        assert hashes[0] in cached and hashes[-1] in cached

        second = shared + " again"
        second_ids = llama.tokenizer.encode(second)
        got2, _, last2 = await collect(engine, EngineRequest("p2", prompt=second, sampling=greedy(6)))
        assert last2.usage is not None
        common = 0
        while common < min(len(first_ids), len(second_ids)) and first_ids[common] == second_ids[common]:
            common += 1
        assert last2.usage.cached_prompt_tokens == (common // 4) * 4 > 0
        assert got1 == reference_greedy(llama_ref, first_ids, 6)
        assert got2 == reference_greedy(llama_ref, second_ids, 6)
        # The identical prompt again: everything but the last token comes from the cache.
        got3, _, last3 = await collect(engine, EngineRequest("p3", prompt=shared, sampling=greedy(6)))
        assert got3 == got1
        assert last3.usage is not None and last3.usage.cached_prompt_tokens == ((len(first_ids) - 1) // 4) * 4
    finally:
        await engine.stop()


async def test_preemption_under_tiny_pool_keeps_outputs(llama: LoadedModel, llama_ref: Any) -> None:
    """Four sequences that cannot all fit at once: some are preempted and recomputed, outputs unchanged."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0] + " now", PROMPTS[2] + " the mind"]
    needs = [blocks_needed(llama, p, 16) for p in prompts]
    assert sum(needs) > max(needs) + 2
    engine = await running_engine(llama, num_blocks=max(needs) + 2, enable_prefix_caching=False)
    try:
        results = await asyncio.gather(
            *(collect(engine, EngineRequest(f"q{i}", prompt=p, sampling=greedy(16))) for i, p in enumerate(prompts))
        )
        assert engine.scheduler.num_preemptions > 0
        for prompt, (got, _, _) in zip(prompts, results, strict=True):
            assert got == reference_greedy(llama_ref, llama.tokenizer.encode(prompt), 16)
        assert engine.pool.num_used == 0
    finally:
        await engine.stop()


async def test_preemption_with_sampling_keeps_seeded_outputs(llama: LoadedModel) -> None:
    """Seeded sampling gives the same text alone and when preempted in a crowded tiny pool."""
    params = SamplingParams(max_tokens=14, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    roomy = await running_engine(llama)
    try:
        alone, _, _ = await collect(roomy, EngineRequest("alone", prompt=PROMPTS[1], sampling=params))
    finally:
        await roomy.stop()
    needs = [blocks_needed(llama, PROMPTS[i % 3], 14) for i in range(3)] + [blocks_needed(llama, PROMPTS[1], 14)]
    tight = await running_engine(llama, num_blocks=max(needs) + 1, enable_prefix_caching=False)
    try:
        others = [
            collect(tight, EngineRequest(f"o{i}", prompt=PROMPTS[i % 3], sampling=greedy(14))) for i in range(3)
        ]
        crowded, *_ = await asyncio.gather(
            collect(tight, EngineRequest("crowded", prompt=PROMPTS[1], sampling=params)), *others
        )
        assert tight.scheduler.num_preemptions > 0
        assert crowded[0] == alone
    finally:
        await tight.stop()


# ---------------------------------------------------------------- cancellation, rejection, seeds


async def test_cancellation_frees_every_block(llama: LoadedModel) -> None:
    """Leaving the stream early (running and still-waiting requests) returns every block to the pool."""
    engine = await running_engine(llama, max_num_seqs=1, enable_prefix_caching=False)
    try:
        stream = engine.generate(EngineRequest("c1", prompt=PROMPTS[1], sampling=greedy(200)))
        first = await stream.__anext__()
        assert first.finish_reason is None
        waiting = asyncio.create_task(collect(engine, EngineRequest("c2", prompt=PROMPTS[0], sampling=greedy(200))))
        await asyncio.sleep(0)
        assert engine.pool.num_used > 0
        await stream.aclose()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for _ in range(500):  # the loop frees them at its next step
            if engine.pool.num_used == 0 and not engine.scheduler.has_work():
                break
            await asyncio.sleep(0.01)
        assert engine.pool.num_used == 0
        assert not engine.scheduler.running and not engine.scheduler.waiting
        # The engine still serves after cancellations.
        ids, _, last = await collect(engine, EngineRequest("c3", prompt=PROMPTS[0], sampling=greedy(3)))
        assert len(ids) == 3 and last.finish_reason == "length"
    finally:
        await engine.stop()


async def test_requests_that_can_never_run_are_rejected(llama: LoadedModel) -> None:
    """Empty prompt, too long for the context, more blocks than the pool, bad ids, duplicate id."""
    engine = await running_engine(llama, num_blocks=8)
    try:
        cases = [
            (EngineRequest("e", prompt=""), "prompt"),
            (EngineRequest("e", prompt_token_ids=[]), "prompt"),
            (EngineRequest("l", prompt="To be", sampling=greedy(llama.max_model_len)), "sampling.max_tokens"),
            (EngineRequest("b", prompt_token_ids=[5] * 30, sampling=greedy(10)), "prompt"),
            (EngineRequest("v", prompt_token_ids=[1, 99999]), "prompt_token_ids"),
        ]
        for req, field in cases:
            with pytest.raises(RequestRejected) as info:
                await engine.generate(req).__anext__()
            assert info.value.field == field
        stream = engine.generate(EngineRequest("dup", prompt="To be", sampling=greedy(20)))
        await stream.__anext__()
        with pytest.raises(RequestRejected) as info:
            await engine.generate(EngineRequest("dup", prompt="To be")).__anext__()
        assert info.value.field == "request_id"
        await stream.aclose()
    finally:
        await engine.stop()


async def test_request_beyond_the_waiting_bound_is_refused_before_any_work(llama: LoadedModel) -> None:
    """With max_waiting requests waiting, the next one raises QueueFull before it is tokenized or
    queued (nothing of it reaches the engine); once the queue drains, requests are admitted again."""
    engine = await running_engine(llama, max_num_seqs=1, max_waiting=2)
    try:
        stream = engine.generate(EngineRequest("q-run", prompt=PROMPTS[1], sampling=greedy(200)))
        await stream.__anext__()
        waiters = [
            asyncio.create_task(
                collect(engine, EngineRequest(f"q-wait{i}", prompt=PROMPTS[0], sampling=greedy(3)))
            )
            for i in range(2)
        ]
        await asyncio.sleep(0)
        assert engine.load().waiting == 2
        tokenized: list[str] = []
        original = engine._tokenize
        engine._tokenize = lambda request: tokenized.append(request.request_id) or original(request)  # type: ignore[method-assign]
        with pytest.raises(QueueFull) as info:
            await engine.generate(EngineRequest("q-over", prompt=PROMPTS[0], sampling=greedy(3))).__anext__()
        assert (info.value.waiting, info.value.max_waiting) == (2, 2)
        assert "2 requests waiting, bound 2" in str(info.value)
        assert tokenized == [] and "q-over" not in engine._live and engine.load().waiting == 2
        engine._tokenize = original  # type: ignore[method-assign]
        await stream.aclose()
        for task in waiters:
            ids, _, last = await task
            assert len(ids) == 3 and last.finish_reason == "length"
        ids, _, _ = await collect(engine, EngineRequest("q-after", prompt=PROMPTS[0], sampling=greedy(3)))
        assert len(ids) == 3
    finally:
        await engine.stop()


def test_max_waiting_must_be_positive(llama: LoadedModel) -> None:
    with pytest.raises(ValueError, match="max_waiting"):
        Engine(llama, EngineConfig(block_size=4, num_blocks=16, max_waiting=0))


async def test_seed_reproduces_regardless_of_batch(llama: LoadedModel) -> None:
    """The same seed and prompt give the same tokens alone and in a batch; another seed differs."""
    engine = await running_engine(llama)
    try:
        params = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
        alone, _, _ = await collect(engine, EngineRequest("a", prompt=PROMPTS[0], sampling=params))
        batch = await asyncio.gather(
            collect(engine, EngineRequest("x1", prompt=PROMPTS[1], sampling=greedy(20))),
            collect(engine, EngineRequest("x2", prompt=PROMPTS[0], sampling=params)),
            collect(engine, EngineRequest("x3", prompt=PROMPTS[3], sampling=SamplingParams(max_tokens=20, seed=5))),
        )
        assert batch[1][0] == alone
        other, _, _ = await collect(
            engine, EngineRequest("b", prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=20, temperature=1.0, top_k=50, seed=99, ignore_eos=True))
        )
        assert other != alone
    finally:
        await engine.stop()


# ---------------------------------------------------------------- text: stop strings and UTF-8


async def test_stop_string_ends_generation_and_is_never_emitted(llama: LoadedModel) -> None:
    """A stop string taken from the middle of the greedy text ends it there; the string is not streamed."""
    engine = await running_engine(llama)
    try:
        _, full, _ = await collect(engine, EngineRequest("full", prompt=PROMPTS[1], sampling=greedy(30)))
        stop = next(full[i : i + 3] for i in range(len(full) // 3, len(full) - 3) if full[i : i + 3].strip())
        cut = full.index(stop)
        chunks: list[str] = []
        last = None
        async for out in engine.generate(EngineRequest("stop", prompt=PROMPTS[1], sampling=greedy(30, stop=(stop,)))):
            chunks.append(out.text)
            last = out
        assert last is not None and last.finish_reason == "stop_sequence"
        assert "".join(chunks) == full[:cut]
        assert all(stop not in c for c in chunks)
    finally:
        await engine.stop()


def test_streamed_text_never_splits_utf8_characters(llama: LoadedModel) -> None:
    """Byte-level tokens of multi-byte characters stream as whole characters only."""
    tok = llama.tokenizer
    text = " déjà vu 日本語 テキスト 🎭✓ naïve"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters really are split across tokens
    state = OutputState(tok, tok.encode("To be"), ())
    chunks = [state.push(t)[0] for t in ids]
    chunks.append(state.finish())
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == text
    assert any(c == "" for c in chunks)  # held back while a character was incomplete


def test_stop_string_split_across_tokens_is_held_back(llama: LoadedModel) -> None:
    """Text that may begin a stop string is held until it is known not to."""
    tok = llama.tokenizer
    ids = tok.encode(" the fruit of that tree")
    state = OutputState(tok, [], ("that tree",))
    emitted = ""
    stopped = False
    for t in ids:
        text, stopped = state.push(t)
        emitted += text
        if stopped:
            break
    assert stopped and emitted == " the fruit of "


# ---------------------------------------------------------------- cache bookkeeping and load


def test_block_pool_refcounts_and_lru_eviction() -> None:
    """Shared blocks are counted; free cached blocks are evicted least recently used first."""
    from switchboard.generator.engine.kv_cache import BlockPool

    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.register(a, 101)
    pool.register(b, 102)
    pool.acquire(a)  # shared by two sequences
    pool.release(a)
    assert pool.num_free == 0
    pool.release(a)
    pool.release(b)
    pool.release(c)
    assert pool.num_free == 3
    assert pool.lookup(101) == a and pool.lookup(102) == b
    # The unhashed block goes first, then the least recently freed cached one (a).
    assert pool.allocate() == c
    assert pool.allocate() == a
    assert pool.lookup(101) is None and pool.lookup(102) == b
    pool.acquire(b)  # a cache hit revives a free cached block
    assert pool.num_free == 0


async def test_load_reports_running_waiting_and_blocks(llama: LoadedModel) -> None:
    """The load snapshot counts running sequences and used blocks while a request streams."""
    engine = await running_engine(llama)
    try:
        stream = engine.generate(EngineRequest("l1", prompt=PROMPTS[1], sampling=greedy(100)))
        await stream.__anext__()
        load = engine.load()
        assert load.running == 1 and load.kv_blocks_used > 0 and load.kv_blocks_total == 128
        await stream.aclose()
        info = engine.info
        assert info.architecture == "llama" and info.block_size == 4 and info.vocab_size == 320
    finally:
        await engine.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_cuda_greedy_matches_cpu(llama_dir: Path, llama: LoadedModel) -> None:
    """The same engine code on CUDA (float32) gives the CPU engine's greedy tokens."""
    cuda = load_model(llama_dir, "cuda", "float32")
    results = []
    for loaded in (llama, cuda):
        engine = await running_engine(loaded)
        try:
            results.append(
                await asyncio.gather(
                    *(collect(engine, EngineRequest(f"g{i}", prompt=p, sampling=greedy(8))) for i, p in enumerate(PROMPTS))
                )
            )
        finally:
            await engine.stop()
    assert [r[0] for r in results[0]] == [r[0] for r in results[1]]


def test_profile_writes_a_cost_model(llama_dir: Path, tmp_path: Path, llama: LoadedModel) -> None:
    """The profile command measures real steps and fits a non-negative linear cost model."""
    import json

    from switchboard.generator.engine.profile import CostModel, main, profile

    engine = Engine(llama, EngineConfig(block_size=4, num_blocks=64))
    result = profile(engine, repeats=1, prefill_tokens=(8, 32), decode_batches=(1, 4), decode_contexts=(16,))
    kinds = [s["kind"] for s in result["samples"]]
    assert kinds == ["prefill", "prefill", "decode", "decode"]
    assert all(s["ms"] > 0 for s in result["samples"])
    out = tmp_path / "cost.json"
    assert main(["--model", str(llama_dir), "--out", str(out), "--dtype", "float32", "--repeats", "1"]) == 0
    model = CostModel.load(out)
    assert json.loads(out.read_text())["architecture"] == "llama"
    assert min(model.base_ms, model.prefill_token_ms, model.decode_seq_ms, model.context_token_ms) >= 0
    assert model.step_ms(prefill_tokens=64, decode_seqs=4, decode_context_tokens=64) > 0


async def test_stop_ends_open_streams_as_cancelled(llama: LoadedModel) -> None:
    """engine.stop() ends every open stream with finish_reason "cancelled" and usage."""
    engine = await running_engine(llama)
    stream = engine.generate(EngineRequest("s1", prompt=PROMPTS[0], sampling=greedy(200)))
    await stream.__anext__()
    await engine.stop()
    outs = [out async for out in stream]
    assert outs[-1].finish_reason == "cancelled" and outs[-1].usage is not None
    assert engine.pool.num_used == 0
    with pytest.raises(RuntimeError):
        await engine.generate(EngineRequest("s2", prompt=PROMPTS[0])).__anext__()


async def test_fatal_step_error_fails_requests_and_marks_engine(llama: LoadedModel) -> None:
    """An exception inside a step (as a device OOM would raise) fails in-flight requests and sets engine.failed."""
    engine = await running_engine(llama)

    def failing_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("simulated device out of memory")

    engine.model.forward_step = failing_step
    try:
        with pytest.raises(RuntimeError, match="simulated device out of memory"):
            await collect(engine, EngineRequest("f1", prompt=PROMPTS[0], sampling=greedy(5)))
        assert isinstance(engine.failed, RuntimeError)
        with pytest.raises(RuntimeError, match="engine failed"):
            await engine.generate(EngineRequest("f2", prompt=PROMPTS[0])).__anext__()
    finally:
        del engine.model.forward_step  # back to the class method
        await engine.stop()


def test_bfloat16_step_stays_close_to_float32_reference(llama_dir: Path, llama_ref: Any) -> None:
    """The CPU bfloat16 path keeps the reference's logits within bf16 precision and its top choice."""
    loaded = load_model(llama_dir, "cpu", "bfloat16")
    cfg = loaded.model.config
    cache = KVCache(cfg.num_hidden_layers, 16, 4, cfg.num_key_value_heads, cfg.head_size, torch.bfloat16, torch.device("cpu"))
    ids = torch.tensor(loaded.tokenizer.encode(PROMPTS[1]))
    n = len(ids)
    with torch.inference_mode():
        want = llama_ref(ids[None]).logits[0]
        attn = AttentionContext(cache, [SequenceSlice(list(range(16)), 0, n)], torch.device("cpu"))
        got = loaded.model.forward_step(ids, torch.arange(n), attn, torch.arange(n)).float()
    scale = want.abs().max()
    assert (got - want).abs().max() < 0.03 * scale
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= 0.9


async def test_given_step_executor_runs_every_step_and_is_left_running(llama: LoadedModel) -> None:
    """A server's compute thread: steps run on it, and stopping the engine does not shut it down."""
    import concurrent.futures
    import threading

    compute = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-compute")
    try:
        engine = Engine(llama, EngineConfig(block_size=4, num_blocks=64), step_executor=compute)
        threads: set[str] = set()
        step = engine._step

        def recording_step() -> Any:
            threads.add(threading.current_thread().name)
            return step()

        engine._step = recording_step  # type: ignore[method-assign]
        await engine.start()
        try:
            ids, _, last = await collect(engine, EngineRequest("x", prompt=PROMPTS[0], sampling=greedy(5)))
        finally:
            await engine.stop()
        assert len(ids) == 5 and last.finish_reason == "length"
        assert threads and all(name.startswith("test-compute") for name in threads)
        assert compute.submit(lambda: 1).result() == 1  # still usable
    finally:
        compute.shutdown()
