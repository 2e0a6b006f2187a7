"""Learned placement (issue 17): a small MLP scores each candidate replica; numpy inference only.

`LearnedPlacementPolicy.rank(query, candidates)` is the `PlacementPolicy` protocol: per candidate a
feature vector (`FEATURE_NAMES`: its load, what was placed on it since its last heartbeat, its
prefix-cache hit for this request, the predicted TTFT/TPOT of the predicted-latency policy's cost
model, the prefix-load policy's score, and the request's size), normalized with the file's
statistics, goes through one MLP with weights shared by every candidate; candidates are ranked by
score, highest first (ties: replica id). The network is trained in the simulator (`switchboard
scheduler train`, a softmax over these very scores) and stored in a versioned **policy file** (JSON,
`write_policy_file`):

    {"format": "switchboard-placement-policy", "version": 1,
     "features": [...FEATURE_NAMES...], "normalization": {"mean": [...], "std": [...]},
     "activation": "relu", "layers": [{"weight": [[in x out]], "bias": [out]}, ...],
     "training": {...free-form metadata: seed, windows, episodes, scores...}}

The scheduler image has no torch, so inference here is numpy only (`PolicyNetwork.scores`).

**Fallback.** A file that is missing, not a valid policy file (`corrupt`) or made for another
feature set or format version (`schema`) is never used: the policy then ranks with the best
heuristic (`prefix-load` with the configured options), logs why, and counts
`switchboard_scheduler_learned_policy_fallbacks_total{reason}`. The file is re-read when it changes
(checked at most every `reload_seconds`, by its size, mtime and inode): a good new file replaces
the weights at once; a bad one (corrupt, wrong schema, deleted) keeps the last good weights (or
the heuristic, when there never were any), counted and logged once per change.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter
from switchboard.common.experts_config import ExpertSLO
from switchboard.replica.cost_model import CostModel
from switchboard.scheduler.policies import (
    LEARNED,
    PlacementPolicy,
    PlacementQuery,
    PolicyOptions,
    PredictedLatencyPolicy,
    PrefixLoadPolicy,
    cached_prompt_tokens,
    estimate_queue,
    request_size,
)
from switchboard.scheduler.registry import ReplicaView

log = logging.getLogger(__name__)

POLICY_FORMAT = "switchboard-placement-policy"
POLICY_FORMAT_VERSION = 1

# The feature schema, in vector order. Counts of tokens and requests enter as log1p (their range
# spans orders of magnitude); `*_rel` are the candidate's value minus the best candidate's (the
# ranking is relative); headrooms are (objective - prediction) / objective, clipped to [-10, 1],
# 0 without an objective. A file whose "features" differ in any way is another schema.
FEATURE_NAMES: tuple[str, ...] = (
    "waiting",  # reported waiting sequences (log1p)
    "running",  # reported running sequences (log1p)
    "inflight",  # placed here, not completed (log1p)
    "kv_utilization",  # used / total KV blocks
    "queued_requests",  # estimate_queue q (log1p)
    "queued_prompt_tokens",  # estimate_queue Q (log1p)
    "work_tokens",  # prefix-load's work in tokens (log1p)
    "work_tokens_rel",  # minus the least work among the candidates (log1p)
    "cached_tokens",  # this request's prompt tokens cached here (log1p)
    "cached_fraction",  # cached / prompt
    "pred_ttft_ms",  # predicted-latency's TTFT (log1p)
    "pred_tpot_ms",  # predicted-latency's TPOT (log1p)
    "pred_ttft_rel_ms",  # minus the lowest predicted TTFT (log1p)
    "ttft_headroom",
    "tpot_headroom",
    "prefix_load_score",  # prefix-load's score minus the best one's (signed log1p; 0 = its choice)
    "overloaded",  # 1 when prefix-load's guard ranks it after the others
    "heartbeat_age_s",
    # What the heartbeat cannot show yet (the scheduler's own record of what it placed since):
    "placed_since_report_tokens",  # prompt tokens placed since the last heartbeat (log1p)
    "last_placed_age_s",  # since the newest placement here (capped at LAST_PLACED_CAP_S)
    "last_placed_remaining_ms",  # that prompt's predicted prefill time minus its age, >= 0 (log1p)
    "prompt_tokens",  # request (log1p)
    "max_tokens",  # request (log1p)
    "candidates",  # how many candidates (log1p)
)
FEATURE_SCHEMA = "placement-v2"
# Older than this, the newest placement says nothing about the replica's present work.
LAST_PLACED_CAP_S = 10.0
# The fallback reasons (the metric's label values).
MISSING, CORRUPT, SCHEMA = "missing", "corrupt", "schema"

FALLBACKS = Counter(
    "switchboard_scheduler_learned_policy_fallbacks_total",
    "Times the learned placement policy could not use its policy file, by reason: missing, corrupt "
    "(not a valid policy file) or schema (another format version or feature set). At start it then "
    "ranks with the prefix-load heuristic; on a reload it keeps the last good weights.",
    ["reason"],
)


class PolicyFileError(Exception):
    """A policy file that cannot be used; `reason` is MISSING, CORRUPT or SCHEMA."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PolicyNetwork:
    """The MLP and its input normalization: `scores(features)` is one score per row (numpy only).

    `layers`: (weight [in, out], bias [out]) per layer; ReLU between layers, the last one has one
    output. `mean`/`std`: the per-feature normalization of `FEATURE_NAMES` vectors.
    """

    mean: np.ndarray
    std: np.ndarray
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    training: Mapping[str, Any] = field(default_factory=dict)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The score of each row of `features` ([n, len(FEATURE_NAMES)], raw as `candidate_features` gives)."""
        h = (features - self.mean) / self.std
        last = len(self.layers) - 1
        for i, (weight, bias) in enumerate(self.layers):
            h = h @ weight + bias
            if i < last:
                np.maximum(h, 0.0, out=h)
        return h[:, 0]

    @classmethod
    def random(cls, seed: int = 0, hidden: int = 32) -> PolicyNetwork:
        """An untrained network (for benchmarks and tests: its cost does not depend on its weights)."""
        rng = np.random.default_rng(seed)
        sizes = (len(FEATURE_NAMES), hidden, hidden, 1)
        layers = tuple(
            (rng.normal(0.0, 1.0 / math.sqrt(a), (a, b)), np.zeros(b)) for a, b in itertools.pairwise(sizes)
        )
        n = len(FEATURE_NAMES)
        return cls(np.zeros(n), np.ones(n), layers)


def policy_payload(network: PolicyNetwork, training: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document of a policy file for `network`."""
    return {
        "format": POLICY_FORMAT,
        "version": POLICY_FORMAT_VERSION,
        "schema": FEATURE_SCHEMA,
        "features": list(FEATURE_NAMES),
        "normalization": {"mean": [float(x) for x in network.mean], "std": [float(x) for x in network.std]},
        "activation": "relu",
        "layers": [{"weight": w.tolist(), "bias": b.tolist()} for w, b in network.layers],
        "training": dict(training if training is not None else network.training),
    }


def write_policy_file(path: str | Path, network: PolicyNetwork, training: Mapping[str, Any] | None = None) -> Path:
    """Write the policy file atomically (a temporary file renamed over it: a reader never sees half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(policy_payload(network, training)) + "\n")
    os.replace(tmp, path)
    return path


def load_policy_file(path: str | Path) -> PolicyNetwork:
    """Read and check a policy file; raises PolicyFileError (missing, corrupt or schema) naming the problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PolicyFileError(MISSING, f"policy file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyFileError(CORRUPT, f"policy file {path} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyFileError(CORRUPT, f"policy file {path} is not JSON ({exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
        raise PolicyFileError(CORRUPT, f"policy file {path} is not a {POLICY_FORMAT} file")
    if data.get("version") != POLICY_FORMAT_VERSION:
        raise PolicyFileError(
            SCHEMA, f"policy file {path} has format version {data.get('version')!r}, this scheduler reads {POLICY_FORMAT_VERSION}"
        )
    features = data.get("features")
    if features != list(FEATURE_NAMES):
        raise PolicyFileError(
            SCHEMA,
            f"policy file {path} was made for another feature set ({_describe(features)}); "
            f"this scheduler computes {FEATURE_SCHEMA} ({len(FEATURE_NAMES)} features)",
        )
    try:
        return _network(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyFileError(CORRUPT, f"policy file {path} has malformed weights: {exc}") from None


def _describe(features: object) -> str:
    if not isinstance(features, list):
        return "no feature list"
    extra = [f for f in features if f not in FEATURE_NAMES]
    missing = [f for f in FEATURE_NAMES if f not in features]
    parts = [f"{len(features)} features"]
    if missing:
        parts.append("missing " + ", ".join(map(str, missing[:3])))
    if extra:
        parts.append("unknown " + ", ".join(map(str, extra[:3])))
    return "; ".join(parts)


def _network(data: dict[str, Any]) -> PolicyNetwork:
    if data.get("activation", "relu") != "relu":
        raise ValueError(f"activation {data.get('activation')!r} (only relu)")
    n = len(FEATURE_NAMES)
    norm = data["normalization"]
    mean = np.asarray(norm["mean"], dtype=np.float64)
    std = np.asarray(norm["std"], dtype=np.float64)
    if mean.shape != (n,) or std.shape != (n,):
        raise ValueError(f"normalization needs {n} means and stds")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ValueError("normalization must be finite with positive stds")
    layers = []
    width = n
    raw = data["layers"]
    if not isinstance(raw, list) or not raw:
        raise ValueError("no layers")
    for i, layer in enumerate(raw):
        weight = np.asarray(layer["weight"], dtype=np.float64)
        bias = np.asarray(layer["bias"], dtype=np.float64)
        if weight.ndim != 2 or weight.shape[0] != width or bias.shape != (weight.shape[1],):
            raise ValueError(f"layer {i}: weight {weight.shape} and bias {bias.shape} do not chain from width {width}")
        if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
            raise ValueError(f"layer {i}: non-finite weights")
        layers.append((weight, bias))
        width = weight.shape[1]
    if width != 1:
        raise ValueError(f"the last layer has {width} outputs, not 1")
    training = data.get("training") or {}
    return PolicyNetwork(mean, std, tuple(layers), training if isinstance(training, dict) else {})


class FeatureExtractor:
    """Computes `FEATURE_NAMES` for each candidate of one request (what the network reads).

    Reuses the heuristics' own helpers: `estimate_queue`, `cached_prompt_tokens`, prefix-load's
    work and overload guard and predicted-latency's `_predict` (with its sibling cost model rule),
    so the features mean exactly what those policies compute.
    """

    def __init__(
        self,
        slos: Mapping[str, ExpertSLO | None] | None = None,
        options: PolicyOptions | None = None,
    ) -> None:
        opts = options or PolicyOptions()
        self.prefix = PrefixLoadPolicy(
            load_weight=opts.prefix_load_weight,
            balance_abs_tokens=opts.prefix_balance_abs_tokens,
            balance_rel=opts.prefix_balance_rel,
        )
        self.latency = PredictedLatencyPolicy(slos, step_tokens=opts.latency_step_tokens, tpot_weight=opts.latency_tpot_weight)

    def features(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> np.ndarray:
        """[len(candidates), len(FEATURE_NAMES)] raw features (before the file's normalization)."""
        prompt, output = request_size(query)
        announced = min(
            (v for v in candidates if v.info.cost_model is not None), key=lambda v: v.replica_id, default=None
        )
        sibling = announced.info.cost_model if announced is not None else None
        slo = self.latency.slos.get(query.expert)
        ttft_goal = slo.ttft_seconds * 1000.0 if slo is not None and slo.ttft_seconds else 0.0
        tpot_goal = slo.tpot_seconds * 1000.0 if slo is not None and slo.tpot_seconds else 0.0
        decode_tokens = self.prefix.decode_seq_tokens
        predict = self.latency._predict
        fallback_cost = sibling or self.latency.default_cost_model
        step_tokens = self.latency.step_tokens
        n = len(candidates)
        # First pass: what each candidate's features are made of; second: the relative ones and
        # the transforms, in plain Python (a few numpy calls on 16 x 21 values cost more than this).
        parts = []
        for view in candidates:
            load = view.load
            cached = cached_prompt_tokens(query, view, prompt)
            queued, queued_tokens, decoding, _context = estimate_queue(view, prompt, output)
            p = predict(view, sibling, prompt, output, cached)
            total = load.kv_blocks_total
            work = queued_tokens + decode_tokens * decoding  # PrefixLoadPolicy.load_tokens, from the same estimate
            parts.append((view, load, total, cached, queued, queued_tokens, work, p.ttft_ms, p.tpot_ms,
                          _remaining_prefill_ms(view, view.info.cost_model or fallback_cost, step_tokens)))
        least = min(part[6] for part in parts)
        fastest = min(part[7] for part in parts)
        prefix = self.prefix
        weight = prefix.load_weight
        limit = max(least + prefix.balance_abs_tokens, least * prefix.balance_rel)
        best = max(part[3] - weight * (part[6] - least) for part in parts)
        log1p = math.log1p
        request = (log1p(prompt), log1p(output), log1p(n))
        rows = []
        for view, load, total, cached, queued, queued_tokens, work, ttft, tpot, remaining in parts:
            score = cached - weight * (work - least) - best  # <= 0: prefix-load's score minus the best
            rows.append((
                log1p(max(load.waiting, 0)),
                log1p(max(load.running, 0)),
                log1p(max(view.inflight, 0)),
                load.kv_blocks_used / total if total > 0 else 0.0,
                log1p(max(queued, 0)),
                log1p(max(queued_tokens, 0.0)),
                log1p(max(work, 0.0)),
                log1p(max(work - least, 0.0)),
                log1p(max(cached, 0)),
                cached / prompt if prompt else 0.0,
                log1p(max(ttft, 0.0)),
                log1p(max(tpot, 0.0)),
                log1p(max(ttft - fastest, 0.0)),
                min(max((ttft_goal - ttft) / ttft_goal, -10.0), 1.0) if ttft_goal else 0.0,
                min(max((tpot_goal - tpot) / tpot_goal, -10.0), 1.0) if tpot_goal else 0.0,
                -log1p(-score) if score < 0 else 0.0,
                1.0 if work > limit else 0.0,
                view.heartbeat_age,
                log1p(max(view.placed_since_report_tokens, 0)),
                min(view.last_placed_age, LAST_PLACED_CAP_S),
                log1p(remaining),
                *request,
            ))
        return np.array(rows, dtype=np.float64)


def _remaining_prefill_ms(view: ReplicaView, cost: CostModel, step_tokens: int) -> float:
    """How much of the newest placement's prefill is predicted to be left: its prompt's prefill
    time on the cost model, in steps of `step_tokens` (predicted-latency's per-step token budget),
    minus the time since it was placed."""
    tokens = view.last_placed_prompt_tokens
    if tokens <= 0 or not math.isfinite(view.last_placed_age):
        return 0.0
    steps = -(-tokens // step_tokens)
    ms = cost.step_ms(tokens) + (steps - 1) * cost.step_ms()
    return max(ms - 1000.0 * view.last_placed_age, 0.0)


def order_by_scores(candidates: Sequence[ReplicaView], scores: np.ndarray) -> list[ReplicaView]:
    """The candidates by score, highest first; ties by replica id."""
    keyed = sorted(range(len(candidates)), key=lambda i: (-float(scores[i]), candidates[i].replica_id))
    return [candidates[i] for i in keyed]


class LearnedPlacementPolicy:
    """Ranks candidates by a learned MLP's scores (see the module docstring), else by the fallback.

    `network` given: use it (no file, no reloads). Otherwise `policy_file` is loaded now (a problem
    is logged, counted and answered by `fallback`) and re-read when it changes, checked at most
    every `reload_seconds` (0: on every rank). `status` says what it ranks with.
    """

    name = LEARNED

    def __init__(
        self,
        policy_file: str | Path | None = None,
        *,
        fallback: PlacementPolicy | None = None,
        slos: Mapping[str, ExpertSLO | None] | None = None,
        options: PolicyOptions | None = None,
        network: PolicyNetwork | None = None,
        reload_seconds: float = 1.0,
        clock: Any = time.monotonic,
    ) -> None:
        opts = options or PolicyOptions()
        self.extractor = FeatureExtractor(slos, opts)
        self.fallback = fallback or self.extractor.prefix
        self.path = Path(policy_file) if policy_file else None
        self.reload_seconds = reload_seconds
        self._clock = clock
        self._checked = -math.inf
        self._signature: tuple[int, int, int] | None = None
        self.network = network
        self.status = "learned (in-memory network)" if network is not None else ""
        if network is None:
            if self.path is None:
                self._fail(PolicyFileError(MISSING, "no policy file configured (SCHEDULER_POLICY_FILE)"), start=True)
            else:
                self._check(start=True)

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """Candidates by the network's score, best first (by the fallback when there is no network)."""
        if self.path is not None:
            now = self._clock()
            if now - self._checked >= self.reload_seconds:
                self._checked = now
                self._check(start=False)
        network = self.network
        if network is None:
            return self.fallback.rank(query, candidates)
        if len(candidates) < 2:
            return list(candidates)
        return order_by_scores(candidates, network.scores(self.extractor.features(query, candidates)))

    def _check(self, start: bool) -> None:
        """Load the file when it changed since the last look (or at start)."""
        assert self.path is not None
        try:
            st = os.stat(self.path)
            signature: tuple[int, int, int] | None = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            signature = None
        if not start and signature == self._signature:
            return
        self._signature = signature
        try:
            network = load_policy_file(self.path)
        except PolicyFileError as exc:
            self._fail(exc, start)
            return
        self.network = network
        self.status = f"learned ({self.path})"
        log.info("learned placement policy loaded from %s (%s)", self.path, _summary(network))

    def _fail(self, exc: PolicyFileError, start: bool) -> None:
        FALLBACKS.labels(reason=exc.reason).inc()
        if self.network is None:
            self.status = f"fallback to {self.fallback.name}: {exc}"
            log.warning("learned placement policy: %s; ranking with %s instead", exc, self.fallback.name)
        else:
            log.warning("learned placement policy: %s; keeping the weights loaded before", exc)


def _summary(network: PolicyNetwork) -> str:
    widths = [w.shape[1] for w, _ in network.layers]
    meta = network.training
    return f"layers {widths}, trained {meta.get('trained_at', '?')} seed {meta.get('seed', '?')}"


def make_learned_policy(
    policy_file: str | Path | None,
    *,
    slos: Mapping[str, ExpertSLO | None] | None = None,
    options: PolicyOptions | None = None,
) -> LearnedPlacementPolicy:
    """`make_policy("learned")`: the policy file of `options.policy_file` (or `policy_file`)."""
    return LearnedPlacementPolicy(policy_file, slos=slos, options=options)
