"""`switchboard router build-data`: experts config resolution, --text corpora and one-line errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from switchboard.cli.main import main
from switchboard.generator.tokenizer import Tokenizer
from switchboard.routing.dataset import RouterDataset

_WORDS = "crown sword night storm garden serpent heaven river stone candle winter harvest".split()


def _config(tmp_path: Path, models: dict[str, str]) -> Path:
    lines = ["experts:"]
    for name, model in models.items():
        lines += [f"  - name: {name}", f"    model: {model}", "    relative_cost: 1.0"]
    path = tmp_path / "experts.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _demo_config(tmp_path: Path) -> Path:
    return _config(tmp_path, {n: n for n in ("bard-small", "milton-small", "scribe-large")})


def _text(path: Path, lines: int) -> Path:
    rng = random.Random(7)
    path.write_text(
        "".join(
            f"Line {i}: the {rng.choice(_WORDS)} and the {rng.choice(_WORDS)} of our {rng.choice(_WORDS)}.\n"
            for i in range(lines)
        )
    )
    return path


def test_text_corpus_is_split_by_position(
    tmp_path: Path, experts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = _text(tmp_path / "chronicle.txt", 400)
    out = tmp_path / "data"
    argv = [
        "router",
        "build-data",
        "--experts-config",
        str(_demo_config(tmp_path)),
        "--text",
        str(text),
        "--no-demo-corpus",
        "--train-samples",
        "6",
        "--test-samples",
        "3",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"router data: {out}" in printed and "samples/s" in printed
    dataset = RouterDataset.load(out)
    assert {r.source for r in dataset.records} == {"text:chronicle.txt"}
    assert [len(dataset.split(s)) for s in ("train", "test")] == [6, 3]
    assert [e.model for e in dataset.experts] == [str(experts[e.name]) for e in dataset.experts]
    assert dataset.recipe["texts"][0]["name"] == "chronicle.txt" and dataset.recipe["corpus"] is None
    tokenizer = Tokenizer.from_dir(experts["bard-small"])
    ids: list[int] = []
    for line in text.read_text().splitlines(keepends=True):
        ids.extend(tokenizer.encode(line, add_special_tokens=False))
    cut = round(len(ids) * 0.7)
    parts = {"train": tokenizer.decode(ids[:cut]), "test": tokenizer.decode(ids[cut:])}
    for record in dataset.records:
        assert record.prompt in parts[record.split]
    # Unchanged inputs: a no-op.
    assert main(argv) == 0
    assert "cached, nothing to do" in capsys.readouterr().out


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["router", "build-data", "--experts-config", str(tmp_path / "nope.yaml")]) == 2
    assert "experts config not found" in _error(capsys)


def test_unknown_expert_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, {"poet": "no-such-expert"})
    assert main(["router", "build-data", "--experts-config", str(config)]) == 2
    err = _error(capsys)
    assert "expert 'poet'" in err and "neither a model folder nor a demo expert" in err
    config = _config(tmp_path, {"poet": str(tmp_path / "missing-folder")})
    assert main(["router", "build-data", "--experts-config", str(config)]) == 2
    assert "does not exist" in _error(capsys)


def test_missing_or_short_text_is_one_line(
    tmp_path: Path, experts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_demo_config(tmp_path))
    assert (
        main(["router", "build-data", "--experts-config", config, "--text", str(tmp_path / "gone.txt")]) == 2
    )
    assert "text file" in _error(capsys)
    short = _text(tmp_path / "short.txt", 5)
    argv = [
        "router",
        "build-data",
        "--experts-config",
        config,
        "--text",
        str(short),
        "--no-demo-corpus",
        "--out",
        str(tmp_path / "data"),
    ]
    assert main(argv) == 2
    assert "too short" in _error(capsys)
    assert not (tmp_path / "data").exists()
    assert main(["router", "build-data", "--experts-config", config, "--no-demo-corpus"]) == 2
    assert "--text" in _error(capsys)


def test_experts_from_config_resolves_demo_names_to_their_folders(
    tmp_path: Path, experts: dict[str, Path]
) -> None:
    from switchboard.routing.cli import experts_from_config

    config = _config(tmp_path, {"poet": "milton-small", "local": str(experts["bard-small"])})
    resolved = experts_from_config(config)
    assert [(e.name, e.model) for e in resolved] == [
        ("poet", str(experts["milton-small"])),
        ("local", str(experts["bard-small"])),
    ]
