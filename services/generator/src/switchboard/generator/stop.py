"""Stop strings over streamed text.

Text arrives in deltas, and a stop string may straddle two of them. `StopMatcher`
emits only text that cannot be part of a stop string: it holds back the longest
suffix that is still a prefix of some stop string, and when a stop string
completes it emits the text before it and reports the match (the stop string
itself is never emitted). Work per delta is bounded by the stop strings'
lengths, not by the length of the whole output.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """Filters a text stream for the first occurrence of any of the stop strings."""

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.matched: str | None = None

    @property
    def held(self) -> str:
        """Text received but not yet emitted because it may begin a stop string."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to emit, whether a stop string matched).

        After a match the stream is over: later calls emit nothing.
        """
        if self.matched is not None:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        first: tuple[int, str] | None = None
        for stop in self.stops:
            at = buffer.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.matched = first[1]
            self._held = ""
            return buffer[: first[0]], True
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        longest = min(len(buffer), max(len(s) for s in self.stops) - 1)
        for size in range(longest, 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0

    def flush(self) -> str:
        """Release held text at the end of generation (no stop string can complete any more)."""
        if self.matched is not None:
            return ""
        text, self._held = self._held, ""
        return text
