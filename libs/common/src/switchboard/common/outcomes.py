"""One rule for a routed request that was never served, shared by the router's and scheduler's accounting."""

from __future__ import annotations


def never_served(cancelled: bool, completion_tokens: int, time_to_first_token_seconds: float) -> bool:
    """Cancelled before the replica produced anything: a cached answer, a request refused after it was
    placed, or a client that left before its first token. Its placement is released, but it says
    nothing about the expert or the replica, so the router does not learn from it and the scheduler
    does not count it against an SLO."""
    return cancelled and completion_tokens == 0 and time_to_first_token_seconds == 0.0
