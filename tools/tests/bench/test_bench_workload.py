"""Trace formats (with malformed rows), synthetic arrivals and workload shaping."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
from switchboard.bench.transform import WorkloadShape, fit_factor, scale_lengths, shape
from switchboard.bench.workload import LengthDist, TraceError, TraceRequest, load_trace, synthetic

from .conftest import TRACES

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_azure_csv_relative_times_and_lengths(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", AZURE_HEADER
                 + "2023-11-16 18:15:46.6805900,374,44\n"
                 + "2023-11-16 18:15:50.9951690,396,109\n"
                 + "\n"
                 + "2023-11-16 18:15:47.0000000,10,0\n")
    reqs = load_trace(path)
    assert [r.input_tokens for r in reqs] == [374, 10, 396]
    # Zero generated tokens becomes one: a request must produce at least one token.
    assert [r.output_tokens for r in reqs] == [44, 1, 109]
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(0.31941)
    assert reqs[2].arrival_s == pytest.approx(4.314579)
    assert [r.index for r in reqs] == [0, 1, 2]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("2023-11-16 18:15:50.99,396\n", "expected 3 columns"),
        ("yesterday,396,10\n", "bad TIMESTAMP"),
        ("2023-11-16 18:15:50.99,abc,10\n", "ContextTokens must be an integer"),
        ("2023-11-16 18:15:50.99,0,10\n", "ContextTokens must be > 0"),
        ("2023-11-16 18:15:50.99,5,-1\n", "GeneratedTokens must be >= 0"),
    ],
)
def test_azure_csv_malformed_row_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = write(tmp_path / "bad.csv", AZURE_HEADER + "2023-11-16 18:15:46.68,374,44\n" + row)
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert f"{path}:3:" in str(err.value)
    assert message in str(err.value)


def test_azure_csv_bad_header(tmp_path: Path) -> None:
    path = write(tmp_path / "h.csv", "time,in,out\n1,2,3\n")
    with pytest.raises(TraceError, match=r"h\.csv:1: expected header"):
        load_trace(path)


def test_real_azure_traces_load() -> None:
    conv = load_trace(TRACES / "azure_llm_2023_conv.csv")
    code = load_trace(TRACES / "azure_llm_2023_code.csv")
    assert len(conv) == 19366 and len(code) == 8819
    assert conv[0].arrival_s == 0.0 and conv[-1].arrival_s > 3000
    assert all(a.arrival_s <= b.arrival_s for a, b in pairwise(conv))


def test_jsonl_with_hash_ids(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 1500, "input_length": 130, "output_length": 7, "hash_ids": [1, 2, 3]},
        {"timestamp": 1000, "input_length": 64, "output_length": 3},
        {"timestamp": 2000, "input_length": 70, "output_length": 9, "hash_ids": [1, 4]},
    ]
    path = write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    reqs = load_trace(path)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 1.0]
    assert [r.hash_ids for r in reqs] == [(), (1, 2, 3), (1, 4)]
    assert [(r.input_tokens, r.output_tokens) for r in reqs] == [(64, 3), (130, 7), (70, 9)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"timestamp": 5, "input_length": 3}', "missing field 'output_length'"),
        ('{"timestamp": "x", "input_length": 3, "output_length": 2}', "timestamp must be a number"),
        ('{"timestamp": 5, "input_length": 3.5, "output_length": 2}', "input_length must be an integer"),
        ('{"timestamp": 5, "input_length": 3, "output_length": 2, "hash_ids": [1, "a"]}', "hash_ids must be a list"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    good = '{"timestamp": 0, "input_length": 3, "output_length": 2}'
    path = write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{line}\n")
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert f"{path}:3:" in str(err.value)
    assert message in str(err.value)


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(write(tmp_path / "t.parquet", "x"))
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "missing.csv")


def test_synthetic_poisson_and_gamma_are_seeded_and_have_the_asked_rate() -> None:
    dist_in, dist_out = LengthDist.parse("uniform:10:20"), LengthDist.parse("fixed:5")
    a = synthetic(4.0, 2000, dist_in, dist_out, 1.0, seed=3)
    assert a == synthetic(4.0, 2000, dist_in, dist_out, 1.0, seed=3)
    assert a[-1].arrival_s / 1999 == pytest.approx(0.25, rel=0.1)
    assert all(10 <= r.input_tokens <= 20 and r.output_tokens == 5 for r in a)
    bursty = synthetic(4.0, 2000, dist_in, dist_out, 0.25, seed=3)
    gaps = [y.arrival_s - x.arrival_s for x, y in pairwise(bursty)]
    mean = sum(gaps) / len(gaps)
    cv2 = sum((g - mean) ** 2 for g in gaps) / len(gaps) / mean**2
    # gamma with shape k has squared coefficient of variation 1/k = 4.
    assert mean == pytest.approx(0.25, rel=0.15)
    assert cv2 == pytest.approx(4.0, rel=0.3)


def test_length_dist_parse_errors() -> None:
    assert LengthDist.parse("lognormal:100:0.5").describe() == "lognormal:100:0.5"
    for bad in ("fixed", "uniform:5:2", "normal:3", "fixed:0"):
        with pytest.raises(ValueError, match="bad length distribution"):
            LengthDist.parse(bad)


def test_shape_window_speedup_cap_and_context_fit() -> None:
    reqs = [TraceRequest(i, float(i), 100 * (i + 1), 50) for i in range(10)]
    out, rep = shape(reqs, WorkloadShape(window_start_s=2.0, window_duration_s=5.0, speedup=2.0, max_requests=4,
                                         fit_context=300))
    assert [r.arrival_s for r in out] == [0.0, 0.5, 1.0, 1.5]
    assert [r.index for r in out] == [0, 1, 2, 3]
    assert rep.requests_in_trace == 10 and rep.requests_in_window == 5 and rep.requests_selected == 4
    # p99 of input+output over (350, 450, 550, 650) = 550 + 0.97 * 100 = 647 -> factor 300/647.
    assert rep.length_scale_used == pytest.approx(300 / 647)
    assert all(r.input_tokens + r.output_tokens <= 300 for r in out)
    assert out[0].input_tokens == round(300 * 300 / 647)
    assert fit_factor(out, 10_000) == 1.0


def test_scale_lengths_clamps_output_then_input() -> None:
    reqs = [TraceRequest(0, 0.0, 1000, 500)]
    out, clamped_in, clamped_out = scale_lengths(reqs, 1.0, context=256, max_input=None, max_output=64)
    assert (out[0].input_tokens, out[0].output_tokens, clamped_in, clamped_out) == (192, 64, 1, 1)
