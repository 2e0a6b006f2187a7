"""Per-request measurements, filled in by a target while its stream arrives.

All times are seconds on one monotonic clock (`time.perf_counter`), relative to the start of
the run. A record is written as chunks arrive, so a request cancelled by its timeout keeps
what it had received.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

STATUS_OK = "ok"
STATUS_TIMEOUT = "timeout"
STATUS_PENDING = "pending"


@dataclass
class RequestRecord:
    """What happened to one request. `status` is `ok`, `timeout`, a gRPC status code name
    (e.g. `UNAVAILABLE`), `http_<code>`, `connect_error` or `protocol_error`."""

    index: int
    scheduled_s: float
    input_tokens: int  # prompt length asked for (exact under the bench tokenizer)
    output_tokens_requested: int
    sent_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    status: str = STATUS_PENDING
    error: str = ""
    finish_reason: str = ""
    prompt_tokens: int | None = None  # as reported by the server (may include BOS/chat template)
    output_tokens: int = 0  # produced: server usage if reported, else counted from the stream
    cached_prompt_tokens: int | None = None
    model: str = ""  # the model / expert that served the request, as the server names it
    # (arrival time relative to sent_s, tokens in that chunk) for every chunk carrying tokens.
    chunks: list[tuple[float, int]] = field(default_factory=list)

    def mark_sent(self, clock_zero: float) -> None:
        """Record the send time."""
        self.sent_s = time.perf_counter() - clock_zero

    def add_chunk(self, clock_zero: float, tokens: int) -> None:
        """Record a chunk carrying `tokens` (>= 1) output tokens arriving now."""
        now = time.perf_counter() - clock_zero
        if self.first_token_s is None:
            self.first_token_s = now
        assert self.sent_s is not None
        self.chunks.append((now - self.sent_s, tokens))

    def finish(self, clock_zero: float, status: str, error: str = "") -> None:
        """Record the end time and final status (only the first call counts)."""
        if self.end_s is not None:
            return
        self.end_s = time.perf_counter() - clock_zero
        self.status = status
        self.error = error[:500]
        if not self.output_tokens:
            self.output_tokens = sum(tokens for _, tokens in self.chunks)

    # Derived figures (None where not defined).
    @property
    def ttft(self) -> float | None:
        """Time to first token, from send."""
        if self.first_token_s is None or self.sent_s is None:
            return None
        return self.first_token_s - self.sent_s

    @property
    def e2e(self) -> float | None:
        """End-to-end latency, from send to the end of the stream."""
        if self.end_s is None or self.sent_s is None:
            return None
        return self.end_s - self.sent_s

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (last chunk - first chunk) / (tokens - 1)."""
        if len(self.chunks) < 1 or self.output_tokens < 2:
            return None
        return (self.chunks[-1][0] - self.chunks[0][0]) / (self.output_tokens - 1)

    def inter_token_gaps(self) -> list[float]:
        """Gaps between successive tokens; a chunk of k tokens after a gap g counts as k gaps of g/k."""
        gaps: list[float] = []
        for (prev_t, _), (t, tokens) in zip(self.chunks, self.chunks[1:], strict=False):
            gaps.extend([(t - prev_t) / tokens] * tokens)
        return gaps

    def to_dict(self) -> dict:
        """JSON-ready form, with the derived figures included for readers of the file."""
        data = asdict(self)
        data["chunks"] = [[round(t, 6), n] for t, n in self.chunks]
        data.update(ttft_s=self.ttft, tpot_s=self.tpot, e2e_s=self.e2e)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RequestRecord:
        """Inverse of `to_dict` (derived figures are recomputed)."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["chunks"] = [(float(t), int(n)) for t, n in fields.get("chunks", [])]
        return cls(**fields)
