"""Protobuf enum values from a peer that may be newer than this build.

proto3 keeps an enum number it does not know as that number, so `Enum.Name(value)` raises
ValueError for a value a newer client or server added. `enum_name` reads such a value as the
enum's zero value (its UNSPECIFIED name), the meaning proto3 gives to "not set", so it never
becomes INTERNAL.
"""

from __future__ import annotations

from typing import Any


def enum_name(enum: Any, value: int) -> str:
    """The name of `value` in `enum` (a generated EnumTypeWrapper); unknown values read as the zero name."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(enum.Name(0))

