"""The tokenizer fingerprint: the same for the same tokenizer however the file is written, another
for any change of content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from switchboard.common.tokenizer_fingerprint import fingerprint_file, tokenizer_fingerprint

DOCUMENT = {
    "version": "1.0",
    "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
    "post_processor": None,
    "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "a": 1, "é": 2}, "merges": []},
}


def test_formatting_key_order_escapes_and_path_do_not_change_it(tmp_path: Path) -> None:
    compact = json.dumps(DOCUMENT, separators=(",", ":"))  # \u00e9 escapes
    pretty = json.dumps(dict(reversed(list(DOCUMENT.items()))), indent=4, ensure_ascii=False)
    digest = tokenizer_fingerprint(compact)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert tokenizer_fingerprint(pretty) == digest == tokenizer_fingerprint(pretty.encode("utf-8"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(pretty, encoding="utf-8")
    (tmp_path / "copy.json").write_text(compact)
    assert fingerprint_file(folder) == fingerprint_file(folder / "tokenizer.json") == fingerprint_file(tmp_path / "copy.json") == digest


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["model"]["vocab"].update({"b": 3}),
        lambda d: d.update(post_processor={"type": "TemplateProcessing"}),
        lambda d: d["added_tokens"][0].update(special=False),
    ],
)
def test_any_change_of_content_changes_it(change) -> None:
    changed = json.loads(json.dumps(DOCUMENT))
    change(changed)
    assert tokenizer_fingerprint(json.dumps(changed)) != tokenizer_fingerprint(json.dumps(DOCUMENT))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", b"\xff\xfe"])
def test_what_is_not_a_tokenizer_document_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError, match=r"not a tokenizer\.json document"):
        tokenizer_fingerprint(text)
