from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from meterline.core.ledger import LedgerCommandError, format_picos, parse_amount, period_key, to_decimal, to_ms


def test_parse_exact() -> None:
    assert parse_amount("10.00") == 10_000_000_000_000
    assert parse_amount("0.000000000001") == 1
    assert parse_amount(Decimal("-2.5")) == -2_500_000_000_000
    assert parse_amount(3) == 3 * 10**12
    assert parse_amount("1E+3") == 1000 * 10**12


@pytest.mark.parametrize("bad", ["0.0000000000001", "abc", "NaN", "Infinity", 1.5, True])
def test_parse_rejects(bad: object) -> None:
    with pytest.raises(LedgerCommandError) as ei:
        parse_amount(bad)  # type: ignore[arg-type]
    assert ei.value.reason_code == "invalid_amount"


def test_format_round_trip() -> None:
    for s in ["10.00", "0.000000000001", "123.456", "-0.50", "0.00"]:
        assert format_picos(parse_amount(s)) == s
    assert to_decimal(parse_amount("7.125")) == Decimal("7.125")


def test_time_helpers() -> None:
    dt = datetime(2026, 11, 5, 23, 59, 59, 999_999, tzinfo=UTC)
    ms = to_ms(dt)
    assert period_key(ms, "day") == "2026-11-05"
    assert period_key(ms + 1, "day") == "2026-11-06"
    assert period_key(ms, "month") == "2026-11"
    assert to_ms(dt.astimezone(timezone(timedelta(hours=5)))) == ms
    with pytest.raises(LedgerCommandError):
        to_ms(datetime(2026, 1, 1))


def test_public_surface_is_pinned() -> None:
    import meterline.core.ledger as ledger

    assert sorted(ledger.__all__) == sorted(
        [
            "MAX_DEDUPE_IDS",
            "MAX_OPEN_HOLDS",
            "COMMAND_ID_WINDOW_MS",
            "MAX_COMMAND_IDS",
            "apply_command",
            "command_ids",
            "command_seen",
            "default_policy",
            "remember_command",
            "dedupe_digest",
            "pack_recent",
            "unpack_recent",
            "PICOS_PER_UNIT",
            "Adjust",
            "Alert",
            "ApplyPricedUsage",
            "Authorize",
            "Budget",
            "Command",
            "CreditGrant",
            "CustomerLedger",
            "Decision",
            "Effects",
            "ExpireDue",
            "Grant",
            "GrantScope",
            "Hold",
            "LedgerCommandError",
            "LedgerEntry",
            "Policy",
            "SetBlock",
            "SetBudget",
            "SetPolicy",
            "SourcePos",
            "PLAN_BLOCK_REASONS",
            "SetPlanGate",
            "usable_credit",
            "StatusChange",
            "TopUp",
            "VelocityRule",
            "Void",
            "apply",
            "apply_many",
            "authorize",
            "balance_view",
            "fold_entries",
            "format_picos",
            "mark_applied",
            "new_ledger",
            "parse_amount",
            "period_key",
            "resume_offsets",
            "status_of",
            "to_decimal",
            "to_ms",
        ]
    )
    assert all(hasattr(ledger, n) for n in ledger.__all__)
