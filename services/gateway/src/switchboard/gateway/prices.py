"""The price table: what a tenant's tokens cost, per expert (and revision), for cost metering and budgets.

One YAML file (GATEWAY_PRICES_FILE) gives, per expert, the price of 1,000 prompt tokens and of
1,000 output tokens in one currency, and or instead the price of one replica-second: the
request's share of the time its replica was busy, as the generator accounts it
(`Usage.replica_seconds`: while n requests are in flight each is charged 1/n of every second, so
the charges add up to the replica's busy time; switchboard.generator.replica_time). A revision may
have its own prices, and `default` prices the experts the table does not name (without it they
cost nothing):

    currency: USD
    default: {prompt_per_1k: 0.001, output_per_1k: 0.002}
    experts:
      bard-small:
        prompt_per_1k: 0.0005
        output_per_1k: 0.0015
        revisions:
          r2: {prompt_per_1k: 0.0006, output_per_1k: 0.002}
      scribe-large: {per_replica_second: 0.0004}   # a GPU's hourly price / 3600

A malformed table is a start error naming the path of the bad value (a typo would otherwise bill
nothing). The file is re-read when its identity changes, as the tenants file is; a bad edit keeps
the last good table, logs why and counts `switchboard_gateway_prices_reload_failures_total`.

Costs are counted in nano-units of the currency (integers) where they are stored and compared
(the limits store's monthly counters), so a month of small requests adds up without float drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Counter
from switchboard.common.logging import get_logger
from switchboard.gateway.config_files import FieldErrors, WatchedFile, file_identity

log = get_logger(__name__)

NANOS_PER_UNIT = 1_000_000_000
TOKENS_PER_PRICE = 1000

RELOAD_FAILURES = Counter(
    "switchboard_gateway_prices_reload_failures_total",
    "Price table reloads refused (malformed or unreadable file); the last good table stays.",
)

_PRICE_KEYS = {"prompt_per_1k", "output_per_1k", "per_replica_second"}
_EXPERT_KEYS = _PRICE_KEYS | {"revisions"}
_TOP_KEYS = {"currency", "default", "experts"}


class PriceTableError(Exception):
    """The price table cannot be read or holds a bad value; the message names its path in the file."""


@dataclass(frozen=True)
class Price:
    """The price of 1,000 prompt tokens, of 1,000 output tokens and of one replica-second (the
    request's share of its replica's busy time, `Usage.replica_seconds`), in the table's currency."""

    prompt_per_1k: float = 0.0
    output_per_1k: float = 0.0
    per_replica_second: float = 0.0

    def cost(self, prompt_tokens: int, output_tokens: int, replica_seconds: float = 0.0) -> float:
        """What these tokens and this replica time cost, in currency units."""
        tokens = (prompt_tokens * self.prompt_per_1k + output_tokens * self.output_per_1k) / TOKENS_PER_PRICE
        return tokens + max(0.0, replica_seconds) * self.per_replica_second

    def cost_nanos(self, prompt_tokens: int, output_tokens: int, replica_seconds: float = 0.0) -> int:
        """What they cost, in nano-units (rounded), as budgets count it."""
        return round(self.cost(prompt_tokens, output_tokens, replica_seconds) * NANOS_PER_UNIT)


FREE = Price()


@dataclass(frozen=True)
class PriceTable:
    """A parsed price table: prices by expert, by (expert, revision), and for every other expert."""

    currency: str = ""
    default: Price = FREE
    experts: Mapping[str, Price] = field(default_factory=dict)
    revisions: Mapping[tuple[str, str], Price] = field(default_factory=dict)

    def price(self, expert: str, revision: str = "") -> Price:
        """The revision's price when it has one, else the expert's, else the default."""
        if revision and (expert, revision) in self.revisions:
            return self.revisions[(expert, revision)]
        return self.experts.get(expert, self.default)


_fields = FieldErrors(PriceTableError)
_fail, _mapping, _check_keys = _fields.fail, _fields.mapping, _fields.check_keys


def _parse_price(raw: Mapping[str, Any], path: str, base: Price = FREE) -> Price:
    values: dict[str, float] = {}
    for name in _PRICE_KEYS:
        if name not in raw:
            continue
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            unit = "per replica-second" if name == "per_replica_second" else "per 1,000 tokens"
            raise _fail(f"{path}.{name}", f"must be a number >= 0 (currency units {unit}), got {value!r}")
        values[name] = float(value)
    return Price(
        values.get("prompt_per_1k", base.prompt_per_1k),
        values.get("output_per_1k", base.output_per_1k),
        values.get("per_replica_second", base.per_replica_second),
    )


def parse_prices(text: str, source: str = "price table") -> PriceTable:
    """Parse the price table's text; PriceTableError names the first bad value."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PriceTableError(f"{source}: not valid YAML ({exc})") from None
    top = _mapping(document, source)
    _check_keys(top, _TOP_KEYS, source)
    currency = top.get("currency", "")
    if not isinstance(currency, str):
        raise _fail("currency", f"must be a string such as USD, got {currency!r}")
    default_section = _mapping(top.get("default"), "default")
    _check_keys(default_section, _PRICE_KEYS, "default")
    default = _parse_price(default_section, "default")
    experts: dict[str, Price] = {}
    revisions: dict[tuple[str, str], Price] = {}
    for name, raw in _mapping(top.get("experts"), "experts").items():
        where = f"experts.{name}"
        if not isinstance(name, str) or not name:
            raise _fail(where, "an expert name must be a non-empty string")
        entry = _mapping(raw, where)
        _check_keys(entry, _EXPERT_KEYS, where)
        # An expert's own prices: the fields it leaves out are free, not the default's (explicit is safer).
        experts[name] = price = _parse_price(entry, where)
        for label, raw_revision in _mapping(entry.get("revisions"), f"{where}.revisions").items():
            at = f"{where}.revisions.{label}"
            if not isinstance(label, str) or not label:
                raise _fail(at, "a revision label must be a non-empty string")
            revision = _mapping(raw_revision, at)
            _check_keys(revision, _PRICE_KEYS, at)
            # A revision inherits the expert's price for a field it leaves out.
            revisions[(name, label)] = _parse_price(revision, at, price)
    return PriceTable(currency=currency, default=default, experts=experts, revisions=revisions)


class PriceBook:
    """The price table in effect, re-read from its file when the file changes (None: everything is free)."""

    def __init__(self, path: Path | None) -> None:
        """Load the file; raise PriceTableError if it is missing or malformed (a start error)."""
        self._path = path
        self._file: WatchedFile[PriceTable] | None = None
        self._table = PriceTable()
        if path is None:
            return
        try:
            identity = file_identity(path)
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PriceTableError(f"cannot read price table {path} (GATEWAY_PRICES_FILE): {exc}") from None
        self._table = parse_prices(text, str(path))
        self._file = WatchedFile(
            path,
            self._table,
            identity,
            lambda text: parse_prices(text, str(path)),
            (PriceTableError,),
            "price table",
            RELOAD_FAILURES,
        )

    @property
    def path(self) -> Path | None:
        """The price table's file (None: no table)."""
        return self._path

    @property
    def table(self) -> PriceTable:
        """The table in effect (after a reload when the file changed)."""
        self.reload_if_changed()
        return self._table

    def price(self, expert: str, revision: str = "") -> Price:
        """The price of the expert (revision) in the table in effect."""
        return self.table.price(expert, revision)

    def reload_if_changed(self) -> bool:
        """Re-read the file if its identity changed; return whether a new table took effect."""
        table = self._file.reload_if_changed() if self._file is not None else None
        if table is None:
            return False
        self._table = table
        log.info("price table reloaded", experts=len(table.experts), currency=table.currency)
        return True
