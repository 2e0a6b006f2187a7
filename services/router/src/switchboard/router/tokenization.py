"""The prompt's token ids, made once upstream with each candidate expert's own tokenizer.

At start the router loads the tokenizer of every expert in the experts config from its model
folder: ROUTER_MODEL_FOLDERS' folder for it when set (the local stack sets it, having resolved the
demo expert names), else the config's `model` when that is a folder here. Experts whose tokenizers have the same
fingerprint (`switchboard.common.tokenizer_fingerprint`, the digest the replicas announce) share
one loaded tokenizer and, per request, one tokenization. An expert whose folder is not there (a
router image carries no model folders) falls back, if it is the gate artifact's cheapest expert,
to the copy of its tokenizer.json in the artifact; otherwise it has no tokenizer: its candidates
get no token ids and their replicas tokenize the prompt text themselves. A wrong guess is safe:
a replica uses upstream ids only when their fingerprint is its own.

The ids are `encode(prompt, add_special_tokens=True)`, what the generator's engine makes from
prompt text (BOS included when the tokenizer's post-processor adds it). No gRPC here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from switchboard.common.experts_config import ExpertSpec
from switchboard.common.logging import get_logger
from switchboard.common.tokenizer_fingerprint import TOKENIZER_FILE, tokenizer_fingerprint

log = get_logger(__name__)

__all__ = ["PromptTokenization", "PromptTokenizers", "load_prompt_tokenizers", "resolve_model_folder"]


@dataclass(frozen=True)
class PromptTokenization:
    """A prompt's token ids as the tokenizer with `fingerprint` makes them."""

    fingerprint: str
    token_ids: tuple[int, ...]


def resolve_model_folder(model: str) -> Path:
    """The model folder an experts-config `model` names; LookupError saying why when there is none here.

    Only an existing folder resolves: the router resolves no names (demo expert names are the
    tools' business; `switchboard up` passes their folders in ROUTER_MODEL_FOLDERS), so the service
    never imports the CLI package.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if "/" in model or model.startswith((".", "~")):
        raise LookupError(f"model folder {path} does not exist here")
    raise LookupError(
        f"{model!r} is not a model folder here; give its folder in ROUTER_MODEL_FOLDERS "
        "(`switchboard up` does for demo experts) or as the expert's `model`"
    )


class PromptTokenizers:
    """Expert -> tokenizer fingerprint, and one loaded tokenizer per distinct fingerprint."""

    def __init__(
        self,
        by_fingerprint: Mapping[str, tokenizers.Tokenizer],
        expert_fingerprints: Mapping[str, str],
        missing: Mapping[str, str] | None = None,
        sources: Mapping[str, Path] | None = None,
    ) -> None:
        unknown = set(expert_fingerprints.values()) - set(by_fingerprint)
        if unknown:
            raise ValueError(f"no tokenizer loaded for fingerprints {sorted(unknown)}")
        self._tokenizers = dict(by_fingerprint)
        self._experts = dict(expert_fingerprints)
        self.missing = dict(missing or {})  # expert -> why it has no tokenizer
        self.sources = dict(sources or {})  # expert -> the tokenizer.json it was loaded from

    def fingerprint(self, expert: str) -> str:
        """The fingerprint of the expert's tokenizer, "" when the router has none for it."""
        return self._experts.get(expert, "")

    @property
    def experts(self) -> dict[str, str]:
        """Expert -> fingerprint, for the experts that have a tokenizer."""
        return dict(self._experts)

    def encode(self, fingerprint: str, prompt: str) -> tuple[int, ...] | None:
        """The prompt's ids under the tokenizer with `fingerprint`; None when it cannot encode it."""
        tokenizer = self._tokenizers.get(fingerprint)
        if tokenizer is None:
            return None
        try:
            # The batch "fast" path skips offset bookkeeping; the ids are the same as encode()'s.
            return tuple(tokenizer.encode_batch_fast([prompt], add_special_tokens=True)[0].ids)
        except Exception as exc:  # tokenizers raises bare Exceptions from its native code
            log.warning("cannot tokenize the prompt; its replicas will", fingerprint=fingerprint[:12], error=str(exc))
            return None


def _read(path: Path) -> tuple[str, tokenizers.Tokenizer]:
    """(fingerprint, tokenizer) of a tokenizer.json; OSError or ValueError when it is unusable."""
    text = path.read_text(encoding="utf-8")
    fingerprint = tokenizer_fingerprint(text)
    try:
        return fingerprint, tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # a bare Exception for a file tokenizers cannot parse
        raise ValueError(f"tokenizers cannot load it: {exc}") from None


def load_prompt_tokenizers(
    experts: Sequence[ExpertSpec],
    fallback: tuple[str, Path] | None = None,
    resolve: Callable[[str], Path] = resolve_model_folder,
    folders: Mapping[str, Path] | None = None,
) -> PromptTokenizers:
    """Load every expert's tokenizer once (see the module docstring).

    fallback: (expert, tokenizer.json) to use for that expert when its own folder has none (the
    gate artifact's copy of its cheapest expert's tokenizer). folders: {expert: model folder}
    overriding the config's `model` (ROUTER_MODEL_FOLDERS).
    """
    by_fingerprint: dict[str, tokenizers.Tokenizer] = {}
    by_path: dict[Path, str] = {}
    fingerprints: dict[str, str] = {}
    sources: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for spec in experts:
        candidates: list[Path] = []
        why = ""
        try:
            model = str((folders or {}).get(spec.name, spec.model))
            candidates.append(resolve(model) / TOKENIZER_FILE)
        except LookupError as exc:
            why = str(exc)
        if fallback is not None and fallback[0] == spec.name:
            candidates.append(fallback[1])
        for path in candidates:
            key = path.resolve()
            try:
                fingerprint = by_path.get(key)
                if fingerprint is None:
                    fingerprint, tokenizer = _read(path)
                    by_fingerprint.setdefault(fingerprint, tokenizer)
                    by_path[key] = fingerprint
            except (OSError, ValueError) as exc:
                why = f"{path}: {exc}"
                continue
            fingerprints[spec.name], sources[spec.name] = fingerprint, path
            break
        else:
            missing[spec.name] = why or "no tokenizer.json found"
    return PromptTokenizers(by_fingerprint, fingerprints, missing, sources)
