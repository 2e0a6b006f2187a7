"""Tokenize once, upstream: the experts' tokenizers loaded once at start, the prompt tokenized once
per distinct tokenizer of the candidates, the first expert's ids sent with the one Place call, and
the tokenizations in the Route answer (candidates naming theirs; none for an expert without one)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from switchboard.common.experts_config import ExpertSpec, load_experts_config
from switchboard.common.settings import ServerSettings, SettingsError
from switchboard.common.tokenizer_fingerprint import fingerprint_file
from switchboard.router import core as core_module
from switchboard.router.config import RouterSettings, parse_model_folders
from switchboard.router.core import Candidate, PlacementRequest, PlacementResult, RouteInput
from switchboard.router.server import build_core, build_tokenizers
from switchboard.router.tokenization import load_prompt_tokenizers, resolve_model_folder
from switchboard.v1 import common_pb2, router_pb2, scheduler_pb2
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from .conftest import running_stack

CORPUS = ["the king doth wake tonight", "of man's first disobedience", "to be or not to be"] * 20
PROMPT = "the king doth wake tonight, to be or not to be"


def train(vocab_size: int, bos: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model folders (tokenizer.json only): a1 and a2 the same tokenizer written differently, b another."""
    root = tmp_path_factory.mktemp("tokenizers")
    out = {name: root / name for name in ("a1", "a2", "b")}
    for folder in out.values():
        folder.mkdir()
    first, other = train(280, bos=True), train(300, bos=False)
    first.save(str(out["a1"] / "tokenizer.json"))
    document = json.loads((out["a1"] / "tokenizer.json").read_text())
    (out["a2"] / "tokenizer.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    other.save(str(out["b"] / "tokenizer.json"))
    return out


def experts_config(tmp_path: Path, folders: dict[str, Path]) -> Path:
    """bard-small and milton-small share tokenizer A (different files), scribe-large has B,
    lost-expert's folder does not exist."""
    path = tmp_path / "experts.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            experts:
              - {{name: bard-small, description: "Shakespeare: the king, thou and thee", model: "{folders['a1']}"}}
              - {{name: milton-small, description: "Milton: man's first disobedience", model: "{folders['a2']}"}}
              - {{name: scribe-large, description: "both, larger", model: "{folders['b']}", relative_cost: 4.0}}
              - {{name: lost-expert, description: "a model that is not here", model: "{tmp_path / 'absent'}"}}
            """
        )
    )
    return path


def test_experts_sharing_a_tokenizer_share_one_and_a_missing_one_says_why(tmp_path: Path, folders: dict[str, Path]) -> None:
    experts = load_experts_config(experts_config(tmp_path, folders))
    loaded = load_prompt_tokenizers(experts)
    a, b = fingerprint_file(folders["a1"]), fingerprint_file(folders["b"])
    assert a == fingerprint_file(folders["a2"]) != b
    assert loaded.experts == {"bard-small": a, "milton-small": a, "scribe-large": b}
    assert loaded.fingerprint("lost-expert") == "" and "does not exist" in loaded.missing["lost-expert"]
    # The ids are what the tokenizer makes with its special tokens (here a BOS).
    ids = loaded.encode(a, PROMPT)
    assert ids == tuple(Tokenizer.from_file(str(folders["a1"] / "tokenizer.json")).encode(PROMPT).ids) and ids[0] == 0
    assert loaded.encode(b, PROMPT) == tuple(Tokenizer.from_file(str(folders["b"] / "tokenizer.json")).encode(PROMPT).ids)
    assert loaded.encode("no-such-fingerprint", PROMPT) is None


def test_the_gate_artifacts_copy_stands_in_for_its_experts_missing_folder(tmp_path: Path, folders: dict[str, Path]) -> None:
    experts = load_experts_config(experts_config(tmp_path, folders))
    loaded = load_prompt_tokenizers(experts, fallback=("lost-expert", folders["b"] / "tokenizer.json"))
    assert loaded.fingerprint("lost-expert") == fingerprint_file(folders["b"]) and not loaded.missing
    # The expert's own folder wins over the copy.
    loaded = load_prompt_tokenizers(experts, fallback=("bard-small", folders["b"] / "tokenizer.json"))
    assert loaded.fingerprint("bard-small") == fingerprint_file(folders["a1"])


def test_unusable_tokenizer_files_are_missing_not_fatal(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    empty = tmp_path / "empty"
    empty.mkdir()
    loaded = load_prompt_tokenizers(
        [ExpertSpec("x", "", str(broken)), ExpertSpec("y", "", str(empty))]
    )
    assert loaded.experts == {} and set(loaded.missing) == {"x", "y"}
    assert "not a tokenizer.json document" in loaded.missing["x"]


def test_model_names_resolve_like_the_generators(tmp_path: Path) -> None:
    assert resolve_model_folder(str(tmp_path)) == tmp_path
    with pytest.raises(LookupError, match="does not exist"):
        resolve_model_folder(str(tmp_path / "absent"))
    # The router resolves no demo expert names (that is the tools' job); the error says what to set.
    with pytest.raises(LookupError, match="ROUTER_MODEL_FOLDERS"):
        resolve_model_folder("bard-small")


def test_model_folders_override_the_configs_model(tmp_path: Path, folders: dict[str, Path]) -> None:
    experts = load_experts_config(experts_config(tmp_path, folders))
    # ROUTER_MODEL_FOLDERS as `switchboard up` sets it: the lost expert's folder is given.
    given = parse_model_folders((f"lost-expert={folders['b']}",))
    loaded = load_prompt_tokenizers(experts, folders=given)
    assert loaded.fingerprint("lost-expert") == fingerprint_file(folders["b"]) and not loaded.missing
    with pytest.raises(SettingsError, match="ROUTER_MODEL_FOLDERS"):
        parse_model_folders(("lost-expert",))


class RecordingPlacer:
    """Places every expert asked on one replica, recording the requests."""

    def __init__(self) -> None:
        self.requests: list[PlacementRequest] = []

    async def place(self, request: PlacementRequest) -> PlacementResult:
        self.requests.append(request)
        return PlacementResult({e: [Candidate(e, f"{e}-1", f"127.0.0.1:{5000 + i}")] for i, e in enumerate(request.experts)})


def make_core(tmp_path: Path, folders: dict[str, Path]):
    config = experts_config(tmp_path, folders)
    experts = load_experts_config(config)
    settings = RouterSettings(server=ServerSettings(port=0, metrics_port=0), experts_config=config, max_alternates=8)
    tokenizers = build_tokenizers(settings, experts)
    placer = RecordingPlacer()
    return build_core(settings, experts, placer, tokenizers=tokenizers), placer, tokenizers


async def test_route_tokenizes_once_per_distinct_tokenizer_and_places_with_the_first_experts_ids(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    core, placer, tokenizers = make_core(tmp_path, folders)
    calls: list[str] = []
    encode = tokenizers.encode

    def counting(fingerprint: str, prompt: str) -> tuple[int, ...] | None:
        calls.append(fingerprint)
        return encode(fingerprint, prompt)

    monkeypatch.setattr(tokenizers, "encode", counting)
    output = await core.route(RouteInput(request_id="r1", prompt=PROMPT))
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 2  # A once for two experts, B once
    (sent,) = placer.requests
    first = sent.experts[0]
    assert sent.tokenizer_fingerprint == tokenizers.fingerprint(first)
    assert sent.prompt_token_ids == encode(tokenizers.fingerprint(first), PROMPT)
    by_fingerprint = {t.fingerprint: t.token_ids for t in output.tokenizations}
    assert set(by_fingerprint) == {fingerprint_file(folders["a1"]), fingerprint_file(folders["b"])}
    assert output.tokenizations[0].fingerprint == output.candidates[0].tokenizer_fingerprint
    assert {c.expert for c in output.candidates} == {"bard-small", "milton-small", "scribe-large", "lost-expert"}
    for candidate in output.candidates:
        assert candidate.tokenizer_fingerprint == tokenizers.fingerprint(candidate.expert)
        if candidate.tokenizer_fingerprint:
            assert by_fingerprint[candidate.tokenizer_fingerprint] == encode(candidate.tokenizer_fingerprint, PROMPT)
    assert output.tokenize_seconds > 0


async def test_a_first_expert_without_a_tokenizer_places_without_ids(tmp_path: Path, folders: dict[str, Path]) -> None:
    core, placer, _ = make_core(tmp_path, folders)
    output = await core.route(RouteInput(request_id="r1", prompt=PROMPT, expert="lost-expert"))
    (sent,) = placer.requests
    assert sent.prompt_token_ids == () and sent.tokenizer_fingerprint == ""
    assert [c.tokenizer_fingerprint for c in output.candidates] == [""] and output.tokenizations == ()


async def test_long_prompts_tokenize_off_the_loop_and_too_many_ids_stay_out_of_place(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    core, placer, tokenizers = make_core(tmp_path, folders)
    long_prompt = " ".join([PROMPT] * 400)
    assert len(long_prompt) > core_module.INLINE_TOKENIZE_CHARS
    threads: list[object] = []
    to_thread = asyncio.to_thread

    async def recording(func, *args):
        threads.append(func)
        return await to_thread(func, *args)

    monkeypatch.setattr(core_module.asyncio, "to_thread", recording)
    monkeypatch.setattr(core_module, "MAX_PLACE_TOKEN_IDS", 100)
    output = await core.route(RouteInput(request_id="r1", prompt=long_prompt, expert="bard-small"))
    assert threads  # tokenized on a worker thread
    fingerprint = tokenizers.fingerprint("bard-small")
    assert output.tokenizations[0].token_ids == tokenizers.encode(fingerprint, long_prompt)
    assert len(output.tokenizations[0].token_ids) > 100
    (sent,) = placer.requests
    assert sent.prompt_token_ids == () and sent.tokenizer_fingerprint == ""  # over the scheduler's bound


async def test_place_sizes_a_long_prompt_by_its_tokenization_not_the_gates_estimate(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    core, placer, tokenizers = make_core(tmp_path, folders)
    long_prompt = " ".join([PROMPT] * 40)  # past the gate's exact prefix: its count is an estimate
    scores = core.gate.score(long_prompt)
    assert not scores.exact_tokens
    await core.route(RouteInput(request_id="r1", prompt=long_prompt, expert="bard-small", max_tokens=16))
    (sent,) = placer.requests
    exact = len(tokenizers.encode(tokenizers.fingerprint("bard-small"), long_prompt))
    assert exact != scores.prompt_tokens
    assert (sent.prompt_tokens, sent.min_model_len) == (exact, exact + 16)


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_route_answers_the_tokenizations_and_sends_ids_to_the_scheduler(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    config = experts_config(tmp_path, folders)
    async with running_stack(max_alternates=8, experts_config=config) as stack:
        placed: list[object] = []
        place = stack.scheduler.servicer.placer.place

        def recording(request):
            placed.append(request)
            return place(request)

        stack.scheduler.servicer.placer.place = recording
        for i, expert in enumerate(("bard-small", "milton-small", "scribe-large", "lost-expert")):
            await stack.scheduler_stub.Register(
                scheduler_pb2.RegisterRequest(replica_id=f"{expert}-1", expert=expert, address=f"127.0.0.1:{5000 + i}")
            )
        assert sample("switchboard_router_expert_tokenizer", {"expert": "lost-expert"}) == 0
        assert sample("switchboard_router_expert_tokenizer", {"expert": "bard-small"}) == 1
        before = sample("switchboard_router_untokenized_candidates_total", {"expert": "lost-expert"})
        reply = await stack.router.Route(
            router_pb2.RouteRequest(request_id="r1", prompt=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=4))
        )
    a, b = fingerprint_file(folders["a1"]), fingerprint_file(folders["b"])
    by_fingerprint = {t.tokenizer_fingerprint: list(t.token_ids) for t in reply.tokenizations}
    assert set(by_fingerprint) == {a, b}  # one entry per distinct tokenizer, not per candidate
    fingerprints = {c.expert: c.tokenizer_fingerprint for c in reply.candidates}
    assert fingerprints == {"bard-small": a, "milton-small": a, "scribe-large": b, "lost-expert": ""}
    assert by_fingerprint[a] == Tokenizer.from_file(str(folders["a1"] / "tokenizer.json")).encode(PROMPT).ids
    (request,) = placed
    assert request.tokenizer_fingerprint == fingerprints[request.experts[0]]
    assert list(request.prompt_token_ids) == by_fingerprint.get(request.tokenizer_fingerprint, [])
    assert sample("switchboard_router_untokenized_candidates_total", {"expert": "lost-expert"}) == before + 1
