"""How a gateway answers a caller that meterline refused: shared by the proxy and the LiteLLM hook."""

from __future__ import annotations

__all__ = ["deny_status"]

_RATE_LIMIT_REASONS = frozenset({"runaway_guard"})


def deny_status(reason: str | None) -> tuple[int, str]:
    """HTTP status and OpenAI error type for a meterline deny reason: 429 when the runaway guard
    stopped a loop (retry later), 402 when credit, a budget or an allowance ran out."""
    if reason in _RATE_LIMIT_REASONS:
        return 429, "rate_limit_exceeded"
    return 402, "insufficient_quota"
