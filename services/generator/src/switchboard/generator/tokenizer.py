"""Tokenizer of a model folder and streaming detokenization.

`Tokenizer` wraps a `tokenizers.Tokenizer` loaded from tokenizer.json and knows
the model's special ids and its fingerprint (`switchboard.common.tokenizer_fingerprint`, the
digest the router names its upstream token ids by). `IncrementalDetokenizer` turns a growing list of
generated ids into text deltas: it decodes only a small window of recent ids
per step (the prefix-offset / read-offset technique of vLLM and TGI), and holds
text back while it ends in an incomplete UTF-8 character, which byte-level BPE
produces whenever a character's bytes are split across tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from switchboard.common.tokenizer_fingerprint import tokenizer_fingerprint

#: What `tokenizers` decodes an incomplete UTF-8 sequence to.
REPLACEMENT_CHAR = "\ufffd"

#: Ids of the prompt to keep as left context for the first decode (spacing rules look back).
PROMPT_CONTEXT_TOKENS = 5


def _special_id(tok: tokenizers.Tokenizer, value: Any) -> int | None:
    """Id of a special token given as a string or as an AddedToken dict in tokenizer_config.json."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        return tok.token_to_id(value)
    return None


def _ids(value: Any) -> set[int]:
    """A config's int-or-list token id field as a set."""
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


class Tokenizer:
    """Text <-> ids for one model, plus its beginning/end-of-sequence ids."""

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        fingerprint: str | None = None,
    ) -> None:
        self.inner = inner
        self.bos_token_id = bos_token_id
        self.eos_token_ids: set[int] = set(eos_token_ids)
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> str:
        """The tokenizer's fingerprint: of the tokenizer.json it was loaded from (`from_dir`), else
        of the in-memory tokenizer's own serialization."""
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.inner.to_str())
        return self._fingerprint

    @classmethod
    def from_dir(cls, path: Path, config: dict[str, Any] | None = None) -> Tokenizer:
        """Load tokenizer.json from a model folder; special ids come from tokenizer_config.json,
        generation_config.json and config.json (all optional)."""
        path = Path(path)
        text = (path / "tokenizer.json").read_text(encoding="utf-8")
        inner = tokenizers.Tokenizer.from_str(text)
        config = config or {}
        tok_config = _read_json(path / "tokenizer_config.json")
        gen_config = _read_json(path / "generation_config.json")
        eos = _ids(gen_config.get("eos_token_id")) | _ids(config.get("eos_token_id"))
        eos_from_tokenizer = _special_id(inner, tok_config.get("eos_token"))
        if eos_from_tokenizer is not None:
            eos.add(eos_from_tokenizer)
        bos = gen_config.get("bos_token_id", config.get("bos_token_id"))
        if bos is None:
            bos = _special_id(inner, tok_config.get("bos_token"))
        return cls(inner, bos_token_id=bos, eos_token_ids=eos, fingerprint=tokenizer_fingerprint(text))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; the tokenizer's post-processor adds BOS where the model expects it."""
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (special tokens such as EOS left out by default)."""
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, or None."""
        return self.inner.token_to_id(token)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an optional file ({} when absent)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


class IncrementalDetokenizer:
    """Text deltas of a growing id list, never splitting a UTF-8 character, O(new ids) per step.

    `prefix_offset..read_offset` is a window of ids already emitted that gives the
    decoder its left context (leading-space rules); ids after `read_offset` are not
    yet emitted. Each step decodes only `ids[prefix_offset:]`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - PROMPT_CONTEXT_TOKENS, 0)
        self.text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; return the newly completed text (may be "" while a character is incomplete)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character decodes to U+FFFD)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        delta = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
