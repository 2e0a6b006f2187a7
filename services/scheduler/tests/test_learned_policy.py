"""The learned placement policy: ranking from a policy file, fallbacks with their metric, reloads, numpy = torch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from switchboard.common.experts_config import ExpertSLO
from switchboard.common.settings import ServerSettings
from switchboard.replica.cost_model import CostModel
from switchboard.replica.hashing import hash_seed, prompt_block_hashes
from switchboard.scheduler.config import SchedulerSettings
from switchboard.scheduler.learned_policy import (
    FEATURE_NAMES,
    POLICY_FORMAT_VERSION,
    FeatureExtractor,
    LearnedPlacementPolicy,
    PolicyFileError,
    PolicyNetwork,
    load_policy_file,
    policy_payload,
    write_policy_file,
)
from switchboard.scheduler.placement import PlacementRequest, Placer
from switchboard.scheduler.policies import (
    LEARNED,
    SELECTABLE_POLICY_NAMES,
    PlacementQuery,
    PrefixLoadPolicy,
    make_policy,
)
from switchboard.scheduler.prefix_index import KvEventIn, KvEventsIn, PrefixIndex
from switchboard.scheduler.registry import (
    LoadSnapshot,
    ReplicaInfo,
    ReplicaRegistry,
    ReplicaState,
    ReplicaView,
)

BLOCK = 16
SEED = hash_seed("model-a")
COST = CostModel(base_ms=2.0, prefill_token_ms=0.02, decode_seq_ms=0.1, context_token_ms=0.0)
PROMPT = tuple(range(1, 257))  # 16 blocks
METRIC = "switchboard_scheduler_learned_policy_fallbacks_total"


def fallbacks(reason: str) -> float:
    return REGISTRY.get_sample_value(METRIC, {"reason": reason}) or 0.0


def view(replica_id: str, waiting: int = 0, running: int = 0, inflight: int = 0, cached: bool = False) -> ReplicaView:
    info = ReplicaInfo(replica_id, "a", "10.0.0.1:1", max_model_len=4096, kv_block_size=BLOCK, kv_hash_seed=SEED,
                       cost_model=COST)
    index = PrefixIndex()
    if cached:
        index.apply(KvEventsIn((KvEventIn(1, tuple(prompt_block_hashes(PROMPT, BLOCK, SEED))),), reset=True))
    load = LoadSnapshot(running=running, waiting=waiting, kv_blocks_used=10, kv_blocks_total=100)
    return ReplicaView(replica_id, "a", info, load, ReplicaState.READY, inflight, 0.1, True, index,
                       inflight * 300, inflight * 50)


def query() -> PlacementQuery:
    return PlacementQuery("r", "a", prompt_tokens=len(PROMPT), max_tokens=32, prompt_token_ids=PROMPT)


def linear(feature: str, weight: float) -> PolicyNetwork:
    """A one-layer network: score = weight x (that raw feature), every other feature ignored."""
    n = len(FEATURE_NAMES)
    w = np.zeros((n, 1))
    w[FEATURE_NAMES.index(feature), 0] = weight
    return PolicyNetwork(np.zeros(n), np.ones(n), ((w, np.zeros(1)),), {"seed": 0})


CANDIDATES = [view("r0", waiting=3), view("r1", waiting=0), view("r2", waiting=7), view("r3", waiting=0)]


def ids(views: list[ReplicaView]) -> list[str]:
    return [v.replica_id for v in views]


def test_ranks_by_the_networks_score_ties_by_id(tmp_path: Path) -> None:
    path = write_policy_file(tmp_path / "policy.json", linear("waiting", -1.0))
    policy = LearnedPlacementPolicy(path)
    assert policy.name == LEARNED and policy.status.startswith("learned")
    assert ids(policy.rank(query(), CANDIDATES)) == ["r1", "r3", "r0", "r2"]
    # The opposite weights, the opposite order (ties still by id).
    flipped = LearnedPlacementPolicy(write_policy_file(tmp_path / "flip.json", linear("waiting", 1.0)))
    assert ids(flipped.rank(query(), CANDIDATES)) == ["r2", "r0", "r1", "r3"]
    assert ids(policy.rank(query(), CANDIDATES[:1])) == ["r0"]


def test_the_prefix_feature_sees_this_requests_cache_hit(tmp_path: Path) -> None:
    candidates = [view("r0"), view("r1", cached=True), view("r2")]
    features = FeatureExtractor().features(query(), candidates)
    assert features.shape == (3, len(FEATURE_NAMES)) and np.all(np.isfinite(features))
    cached = features[:, FEATURE_NAMES.index("cached_tokens")]
    assert cached[1] == pytest.approx(np.log1p(len(PROMPT))) and cached[0] == cached[2] == 0.0
    assert features[1, FEATURE_NAMES.index("cached_fraction")] == pytest.approx(1.0)
    # Its predicted TTFT is lower (no prefill), and prefix-load's score is the best (0).
    ttft = features[:, FEATURE_NAMES.index("pred_ttft_ms")]
    assert ttft[1] < ttft[0]
    assert features[1, FEATURE_NAMES.index("prefix_load_score")] == 0.0
    policy = LearnedPlacementPolicy(network=linear("cached_tokens", 1.0))
    assert ids(policy.rank(query(), candidates))[0] == "r1"


def test_the_recency_features_see_what_the_heartbeat_does_not_show_yet() -> None:
    idle = view("r0")
    busy = view("r1")._replace(placed_since_report_tokens=1500, last_placed_age=0.01, last_placed_prompt_tokens=1000)
    old = view("r2")._replace(placed_since_report_tokens=0, last_placed_age=99.0, last_placed_prompt_tokens=1000)
    features = FeatureExtractor().features(query(), [idle, busy, old])
    assert np.all(np.isfinite(features))
    col = {name: features[:, FEATURE_NAMES.index(name)] for name in FEATURE_NAMES}
    assert list(col["placed_since_report_tokens"]) == pytest.approx([0.0, np.log1p(1500), 0.0])
    assert list(col["last_placed_age_s"]) == pytest.approx([10.0, 0.01, 10.0])  # capped; inf = never
    # 1,000 tokens in two 512-token chunks on COST: 2 x 2 ms + 0.02 ms x 1,000 = 24 ms, 10 ms of it gone.
    assert list(col["last_placed_remaining_ms"]) == pytest.approx([0.0, np.log1p(14.0), 0.0])
    policy = LearnedPlacementPolicy(network=linear("last_placed_remaining_ms", -1.0))
    assert ids(policy.rank(query(), [busy, idle]))[-1] == "r1"


def test_make_policy_and_settings_select_it(tmp_path: Path) -> None:
    path = write_policy_file(tmp_path / "policy.json", linear("waiting", -1.0))
    assert LEARNED in SELECTABLE_POLICY_NAMES
    settings = SchedulerSettings(server=ServerSettings(), placement_policy=LEARNED, policy_file=str(path))
    policy = make_policy(LEARNED, slos={"a": ExpertSLO(1.0, 0.1)}, options=settings.policy_options())
    assert isinstance(policy, LearnedPlacementPolicy) and policy.network is not None
    # Through the real placer and registry, as Place runs it.
    registry = ReplicaRegistry(expiry_seconds=60.0)
    for rid, waiting in (("r0", 4), ("r1", 1), ("r2", 2)):
        registry.register(ReplicaInfo(rid, "a", "10.0.0.1:1", kv_block_size=BLOCK, kv_hash_seed=SEED),
                          LoadSnapshot(running=0, waiting=waiting, kv_blocks_used=0, kv_blocks_total=100))
    result = Placer(registry, policy, {"a"}).place(PlacementRequest(request_id="x", experts=("a",), max_alternates=2))
    assert result.primary is not None and result.primary.replica.replica_id == "r1"
    assert [v.replica_id for v in result.primary.alternates] == ["r2", "r0"]


def _prefix_load_order() -> list[str]:
    return ids(PrefixLoadPolicy().rank(query(), CANDIDATES))


@pytest.mark.parametrize(
    ("content", "reason", "says"),
    [
        (None, "missing", "does not exist"),
        ("{not json", "corrupt", "not JSON"),
        (json.dumps({"format": "something-else"}), "corrupt", "not a switchboard-placement-policy"),
        ("WEIGHTS", "corrupt", "malformed weights"),  # a valid header, weights of the wrong shape
        ("SCHEMA", "schema", "another feature set"),
        ("VERSION", "schema", "format version"),
    ],
)
def test_falls_back_to_prefix_load_and_says_so(tmp_path: Path, caplog, content, reason, says) -> None:
    path = tmp_path / "policy.json"
    good = policy_payload(linear("waiting", -1.0))
    if content == "WEIGHTS":
        good["layers"][0]["weight"] = [[1.0, 2.0]]
        content = json.dumps(good)
    elif content == "SCHEMA":
        good["features"] = [*FEATURE_NAMES[:-1], "priority"]
        content = json.dumps(good)
    elif content == "VERSION":
        good["version"] = POLICY_FORMAT_VERSION + 1
        content = json.dumps(good)
    if content is not None:
        path.write_text(content)
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(path)
    assert info.value.reason == reason and says in str(info.value)
    before = fallbacks(reason)
    with caplog.at_level(logging.WARNING, logger="switchboard.scheduler.learned_policy"):
        policy = LearnedPlacementPolicy(path)
    assert fallbacks(reason) == before + 1
    assert policy.network is None and policy.status.startswith("fallback to prefix-load")
    assert any("ranking with prefix-load" in r.getMessage() and says in r.getMessage() for r in caplog.records)
    assert ids(policy.rank(query(), CANDIDATES)) == _prefix_load_order()


def test_no_file_configured_falls_back() -> None:
    before = fallbacks("missing")
    policy = make_policy(LEARNED)
    assert isinstance(policy, LearnedPlacementPolicy) and policy.network is None
    assert fallbacks("missing") == before + 1
    assert ids(policy.rank(query(), CANDIDATES)) == _prefix_load_order()


def test_reloads_on_change_and_keeps_the_last_good_weights(tmp_path: Path) -> None:
    path = write_policy_file(tmp_path / "policy.json", linear("waiting", -1.0))
    policy = LearnedPlacementPolicy(path, reload_seconds=0.0)
    assert ids(policy.rank(query(), CANDIDATES))[0] == "r1"
    write_policy_file(path, linear("waiting", 1.0))  # a good new file: used at once
    assert ids(policy.rank(query(), CANDIDATES))[0] == "r2"
    corrupt, missing = fallbacks("corrupt"), fallbacks("missing")
    path.write_text('{"format": "switchboard-placement-policy", "version": 1, "feat')  # a half-written file
    for _ in range(3):  # counted once per change, not per Place
        assert ids(policy.rank(query(), CANDIDATES))[0] == "r2"
    assert fallbacks("corrupt") == corrupt + 1
    path.unlink()
    assert ids(policy.rank(query(), CANDIDATES))[0] == "r2"
    assert fallbacks("missing") == missing + 1
    assert policy.status.startswith("learned")
    write_policy_file(path, linear("waiting", -1.0))
    assert ids(policy.rank(query(), CANDIDATES))[0] == "r1"


def test_reload_is_checked_at_most_every_interval(tmp_path: Path) -> None:
    now = [0.0]
    path = write_policy_file(tmp_path / "policy.json", linear("waiting", -1.0))
    policy = LearnedPlacementPolicy(path, reload_seconds=1.0, clock=lambda: now[0])
    policy.rank(query(), CANDIDATES)
    write_policy_file(path, linear("waiting", 1.0))
    now[0] = 0.5
    assert ids(policy.rank(query(), CANDIDATES))[0] == "r1"  # not looked at yet
    now[0] = 1.6
    assert ids(policy.rank(query(), CANDIDATES))[0] == "r2"


def test_a_file_that_appears_later_replaces_the_fallback(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    policy = LearnedPlacementPolicy(path, reload_seconds=0.0)
    assert policy.network is None
    assert ids(policy.rank(query(), CANDIDATES)) == _prefix_load_order()
    write_policy_file(path, linear("waiting", 1.0))
    assert ids(policy.rank(query(), CANDIDATES))[0] == "r2"
    assert policy.status.startswith("learned")


def test_numpy_forward_equals_torch_forward(tmp_path: Path) -> None:
    network = load_policy_file(write_policy_file(tmp_path / "p.json", PolicyNetwork.random(seed=3, hidden=16)))
    n = len(FEATURE_NAMES)
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=n), rng.uniform(0.5, 2.0, size=n)
    network = PolicyNetwork(mean, std, network.layers)
    layers = []
    for i, (w, b) in enumerate(network.layers):
        linear_layer = torch.nn.Linear(w.shape[0], w.shape[1]).double()
        with torch.no_grad():
            linear_layer.weight.copy_(torch.from_numpy(w.T))
            linear_layer.bias.copy_(torch.from_numpy(b))
        layers.append(linear_layer)
        if i < len(network.layers) - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    x = FeatureExtractor().features(query(), [view("a", waiting=2), view("b", cached=True), view("c", inflight=3)])
    x = np.concatenate([x, rng.normal(size=(5, n))])
    with torch.no_grad():
        expected = model((torch.from_numpy(x) - torch.from_numpy(mean)) / torch.from_numpy(std)).squeeze(-1).numpy()
    np.testing.assert_allclose(network.scores(x), expected, rtol=1e-10, atol=1e-10)
