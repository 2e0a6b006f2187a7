"""The tokenizer fingerprint: one digest that tells whether two tokenizers make the same token ids.

The router tokenizes a prompt upstream with an expert's tokenizer and names the ids it sends by
this fingerprint; a generator replica announces the fingerprint of its own tokenizer when it
registers and uses upstream ids only when their fingerprint equals its own. Both sides call this
one function, so they agree.

The fingerprint is the sha256 (64 lowercase hex digits) of the tokenizer's canonical content: its
Hugging Face `tokenizer.json` parsed and written back as compact JSON with sorted keys. So the same
tokenizer gives the same fingerprint whatever the file's formatting (indentation, key order,
`\\u` escapes) or where the file lives, and any change to the vocabulary, merges, normalizer,
pre-tokenizer, post-processor (which adds BOS) or added tokens gives another. A tokenizer made
the same way encodes a prompt as `tokenizer.encode(text, add_special_tokens=True).ids`, which is
what the generator's engine does with prompt text.

No dependency beyond the standard library: every service image can import it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["TOKENIZER_FILE", "fingerprint_file", "tokenizer_fingerprint"]

TOKENIZER_FILE = "tokenizer.json"


def tokenizer_fingerprint(tokenizer_json: str | bytes) -> str:
    """sha256 hex of the canonical form of a `tokenizer.json` document; ValueError if it is not JSON."""
    try:
        document = json.loads(tokenizer_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a tokenizer.json document (invalid JSON: {exc})") from None
    if not isinstance(document, dict):
        raise ValueError("not a tokenizer.json document (expected a JSON object)")
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def fingerprint_file(path: Path | str) -> str:
    """The fingerprint of a `tokenizer.json` file, or of the one in a model folder."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return tokenizer_fingerprint(path.read_bytes())
