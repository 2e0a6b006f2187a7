"""Per-request output state: streaming detokenization, stop strings and the output queue."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from switchboard.generator.stop import StopMatcher
from switchboard.generator.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputState:
    """Turns sampled ids into safe text deltas for one request.

    Text passes through the detokenizer (whole UTF-8 characters only) and then the
    stop matcher (which holds back text that may begin a stop string), so neither a
    broken character nor any part of a stop string is ever streamed.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = StopMatcher(tuple(stop)) if stop else None
        self.queue: asyncio.Queue = asyncio.Queue()

    def push(self, token: int) -> tuple[str, bool]:
        """Text to emit after `token`, and whether a stop string was hit (text then ends before it)."""
        text = self.detokenizer.add((token,))
        if self.stop is None or not text:
            return text, False
        return self.stop.feed(text)

    def finish(self) -> str:
        """Everything still held back, at a normal end (EOS or length)."""
        text = self.detokenizer.flush()
        if self.stop is None:
            return text
        emitted, stopped = self.stop.feed(text) if text else ("", False)
        if stopped:
            return emitted
        return emitted + self.stop.flush()
