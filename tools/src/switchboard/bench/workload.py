"""Workloads: one `TraceRequest` per request, read from a trace file or drawn synthetically.

Formats:
- Azure LLM inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`), timestamps as
  `YYYY-MM-DD HH:MM:SS.fffffff`; arrival times are made relative to the first row.
- JSONL, one object per line: `timestamp` (ms from start), `input_length`, `output_length`,
  optional `hash_ids` (ids of fixed-size prompt blocks; equal leading ids = shared prefix).
- Synthetic: Poisson or gamma inter-arrivals with a burstiness factor, lengths drawn from
  given distributions with a fixed seed.

Bad rows raise `TraceError` naming the file and the line so the trace can be fixed.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of a workload, before prompt synthesis."""

    index: int
    arrival_s: float  # seconds from the start of the workload
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = field(default=())


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _parse_azure_time(text: str) -> datetime:
    """Parse an Azure trace timestamp; Python accepts at most 6 fractional digits."""
    text = text.strip()
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text)


def _positive_int(value: str, name: str, where: str, allow_zero: bool = False) -> int:
    """Parse a token count, raising TraceError with the location on bad input."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise TraceError(f"{where}: {name} must be an integer, got {value!r}") from None
    if number < 0 or (number == 0 and not allow_zero):
        raise TraceError(f"{where}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {number}")
    return number


def load_azure_csv(path: Path) -> list[TraceRequest]:
    """Read an Azure LLM inference trace CSV into requests sorted by arrival."""
    path = Path(path)
    rows: list[tuple[datetime, int, int, int]] = []
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(col.strip() for col in header) != AZURE_COLUMNS:
            raise TraceError(f"{path}:1: expected header {','.join(AZURE_COLUMNS)}, got {header!r}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 3:
                raise TraceError(f"{where}: expected 3 columns, got {len(row)}: {row!r}")
            try:
                stamp = _parse_azure_time(row[0])
            except ValueError:
                raise TraceError(f"{where}: bad TIMESTAMP {row[0]!r}") from None
            # A prompt needs at least one token; zero generated tokens happens in the trace.
            context = _positive_int(row[1], "ContextTokens", where)
            generated = _positive_int(row[2], "GeneratedTokens", where, allow_zero=True)
            rows.append((stamp, context, generated, reader.line_num))
    if not rows:
        raise TraceError(f"{path}: no requests in trace")
    start = min(row[0] for row in rows)
    rows.sort(key=lambda row: (row[0], row[3]))
    return [
        TraceRequest(i, (stamp - start).total_seconds(), context, max(generated, 1))
        for i, (stamp, context, generated, _line) in enumerate(rows)
    ]


def load_jsonl(path: Path) -> list[TraceRequest]:
    """Read a JSONL trace (timestamp ms, input_length, output_length, optional hash_ids)."""
    path = Path(path)
    items: list[tuple[float, int, int, tuple[int, ...], int]] = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{where}: invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in ("timestamp", "input_length", "output_length"):
                if key not in obj:
                    raise TraceError(f"{where}: missing field {key!r}")
            stamp = obj["timestamp"]
            if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp) or stamp < 0:
                raise TraceError(f"{where}: timestamp must be a number of ms >= 0, got {stamp!r}")
            for key in ("input_length", "output_length"):
                if isinstance(obj[key], bool) or not isinstance(obj[key], int):
                    raise TraceError(f"{where}: {key} must be an integer, got {obj[key]!r}")
            input_len = _positive_int(obj["input_length"], "input_length", where)
            output_len = _positive_int(obj["output_length"], "output_length", where)
            hash_ids = obj.get("hash_ids", [])
            if not isinstance(hash_ids, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
            ):
                raise TraceError(f"{where}: hash_ids must be a list of integers, got {hash_ids!r}")
            items.append((stamp / 1000.0, input_len, output_len, tuple(hash_ids), line_no))
    if not items:
        raise TraceError(f"{path}: no requests in trace")
    items.sort(key=lambda item: (item[0], item[4]))
    start = items[0][0]
    return [
        TraceRequest(i, stamp - start, input_len, output_len, hash_ids)
        for i, (stamp, input_len, output_len, hash_ids, _line) in enumerate(items)
    ]


def load_trace(path: Path) -> list[TraceRequest]:
    """Read a trace, choosing the format by extension (.csv Azure, .jsonl/.json JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_azure_csv(path)
    if suffix in (".jsonl", ".json"):
        return load_jsonl(path)
    raise TraceError(f"{path}: unknown trace format {suffix!r} (expected .csv or .jsonl)")


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: `fixed:N`, `uniform:LO:HI` or `lognormal:MEDIAN:SIGMA`."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """Parse the command-line spelling of a length distribution."""
        parts = text.split(":")
        try:
            if parts[0] == "fixed" and len(parts) == 2:
                dist = cls("fixed", float(int(parts[1])))
            elif parts[0] == "uniform" and len(parts) == 3:
                dist = cls("uniform", float(int(parts[1])), float(int(parts[2])))
            elif parts[0] == "lognormal" and len(parts) == 3:
                dist = cls("lognormal", float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad length distribution {text!r}: use fixed:N, uniform:LO:HI or lognormal:MEDIAN:SIGMA"
            ) from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or (dist.kind == "lognormal" and dist.b < 0):
            raise ValueError(f"bad length distribution {text!r}: lengths must be >= 1 and ranges ordered")
        return dist

    def sample(self, rng: random.Random) -> int:
        """Draw one length (>= 1)."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(self.a * math.exp(rng.gauss(0.0, self.b))))

    def describe(self) -> str:
        """The command-line spelling, for the results file."""
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"lognormal:{self.a:g}:{self.b:g}"


def synthetic(
    rate: float,
    count: int,
    input_dist: LengthDist,
    output_dist: LengthDist,
    burstiness: float = 1.0,
    seed: int = 0,
) -> list[TraceRequest]:
    """Draw `count` requests arriving at `rate` req/s.

    burstiness 1.0 gives Poisson arrivals; otherwise inter-arrival gaps follow a gamma
    distribution with shape = burstiness and the same mean (shape < 1 is burstier), as in
    vLLM's `bench serve`.
    """
    if rate <= 0 or count < 1 or burstiness <= 0:
        raise ValueError("synthetic workload needs rate > 0, count >= 1 and burstiness > 0")
    rng = random.Random(seed)
    now = 0.0
    out: list[TraceRequest] = []
    for index in range(count):
        out.append(TraceRequest(index, now, input_dist.sample(rng), output_dist.sample(rng)))
        # gamma(shape k, scale theta) has mean k*theta; theta = 1/(rate*k) keeps the mean gap 1/rate.
        now += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out
