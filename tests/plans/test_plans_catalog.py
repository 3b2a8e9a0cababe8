"""The plan file: the issue's format, validated as strictly as a price file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meterline.core.plans import (
    PlanFileError,
    catalog_from_records,
    decode_plan_record,
    load_plan_catalog,
    version_conflicts,
)
from tests.plans.helpers import catalog, plan

ISSUE_YAML = """
currency: USD
plans:
  - id: pro
    version: 1
    effective_from: "2026-01-01T00:00:00Z"
    interval: month                # day | week | month | year
    fee: "200.00"
    allowances:
      - id: tokens
        tokens: 10000000
        token_classes: [input, output]
        rollover: {max: 5000000}
    overage:
      per_million: "30.00"
    on_exhausted: allow
  - id: team
    version: 2
    effective_from: 2026-02-01T00:00:00Z
    interval: year
    fee: 0
    allowances:
      - id: spend
        amount: "50.00"
        models: [{provider: openai, model: gpt-4o}]
    overage:
      tiers: {mode: volume, unit: amount, steps: [{up_to: "100", multiplier: "1.0"}, {up_to: null, multiplier: 0.8}]}
    on_exhausted: cap
    cap: "500.00"
    minimum_commitment: "100.00"
"""


def test_the_issue_format_loads(tmp_path: Path) -> None:
    f = tmp_path / "plans.yaml"
    f.write_text(ISSUE_YAML)
    cat = load_plan_catalog(f)
    assert [v.key for v in cat.versions] == ["pro@1", "team@2"]
    pro, team = cat.versions
    assert pro.fee == 200 * 10**12 and pro.allowances[0].included == 10_000_000
    assert pro.allowances[0].token_classes == ("input", "output") and pro.allowances[0].rollover_max == 5_000_000
    assert pro.overage.rate_picos == 30 * 10**6
    assert team.cap == 500 * 10**12 and team.minimum_commitment == 100 * 10**12
    assert team.overage.mode == "volume" and team.overage.steps[1].up_to is None
    # JSON of the same catalog loads to the same hashes
    as_json = json.dumps({"currency": "USD", "plans": [v.to_json() for v in cat.versions]})
    j = tmp_path / "plans.json"
    j.write_text(as_json)
    assert [v.plan_hash for v in load_plan_catalog(j).versions] == [v.plan_hash for v in cat.versions]


def test_records_round_trip_and_are_deterministic() -> None:
    cat = load_plan_catalog(ISSUE_YAML)
    recs = cat.to_records()
    assert recs == load_plan_catalog(ISSUE_YAML).to_records()
    assert [k for k, _ in recs] == ["plan:pro@1", "plan:team@2"]
    assert [decode_plan_record(k, v) for k, v in recs] == list(cat.versions)
    assert catalog_from_records(recs).versions == cat.versions
    # a tampered record is refused
    k, v = recs[0]
    with pytest.raises(PlanFileError):
        decode_plan_record(k, v.replace(b'"200"', b'"199"'))


def test_a_published_version_is_immutable() -> None:
    old = catalog(plan())
    assert version_conflicts(catalog(plan()), old) == []
    assert version_conflicts(catalog(plan(fee="199.00")), old) == ["pro@1"]
    assert version_conflicts(catalog(plan(version=2, fee="199.00")), old) == []


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"fee": 200.5}, "plans[0].fee"),
        ({"fee": "200.0000000000001"}, "plans[0].fee"),
        ({"fee": "-1"}, "plans[0].fee"),
        ({"interval": "quarter"}, "plans[0].interval"),
        ({"version": 0}, "plans[0].version"),
        ({"version": True}, "plans[0].version"),
        ({"effective_from": "2026-01-01T00:00:00"}, "plans[0].effective_from"),
        ({"effective_from": "2026-01-01T00:00:00.5Z"}, "plans[0].effective_from"),
        ({"colour": "red"}, "plans[0]"),
        ({"on_exhausted": "stop"}, "plans[0].on_exhausted"),
        ({"on_exhausted": "cap"}, "plans[0].cap"),
        ({"cap": "5"}, "plans[0].cap"),
        ({"overage": {}}, "plans[0].overage"),
        ({"overage": {"per_million": "30", "rate_card": {"multiplier": "1"}}}, "plans[0].overage"),
        ({"overage": {"per_million": "0.0000001"}}, "plans[0].overage.per_million"),
        ({"overage": {"rate_card": {"multiplier": "1"}}}, "plans[0].allowances[0]"),
        ({"allowances": [{"id": "a", "tokens": 0}]}, "plans[0].allowances[0].tokens"),
        ({"allowances": [{"id": "a", "tokens": 1.5}]}, "plans[0].allowances[0].tokens"),
        ({"allowances": [{"id": "a", "tokens": 5, "amount": "1"}]}, "plans[0].allowances[0]"),
        (
            {"allowances": [{"id": "a", "tokens": 5, "token_classes": ["thinking"]}]},
            "plans[0].allowances[0].token_classes[0]",
        ),
        (
            {"allowances": [{"id": "a", "tokens": 5}, {"id": "a", "tokens": 5, "token_classes": ["input"]}]},
            "plans[0].allowances[1].id",
        ),
        (
            {"allowances": [{"id": "a", "tokens": 5}, {"id": "b", "tokens": 5, "token_classes": ["input"]}]},
            "plans[0].allowances[1]",
        ),
        (
            {"allowances": [{"id": "a", "amount": "5", "token_classes": ["input"]}], "overage": {"rate_card": {}}},
            "plans[0].allowances[0].token_classes",
        ),
        (
            {"allowances": [{"id": "a", "tokens": 5, "rollover": {"max": 1, "min": 0}}]},
            "plans[0].allowances[0].rollover",
        ),
        ({"overage": {"tiers": {"mode": "stairs", "unit": "tokens", "steps": []}}}, "plans[0].overage.tiers.mode"),
        (
            {"overage": {"tiers": {"mode": "volume", "unit": "tokens", "steps": [{"up_to": 5, "per_million": "1"}]}}},
            "plans[0].overage.tiers.steps[0].up_to",
        ),
        (
            {
                "overage": {
                    "tiers": {
                        "mode": "volume",
                        "unit": "tokens",
                        "steps": [{"up_to": None, "per_million": "1"}, {"up_to": None, "per_million": "1"}],
                    }
                }
            },
            "plans[0].overage.tiers.steps[0].up_to",
        ),
        (
            {
                "overage": {
                    "tiers": {
                        "mode": "volume",
                        "unit": "tokens",
                        "steps": [
                            {"up_to": 5, "per_million": "1"},
                            {"up_to": 5, "per_million": "1"},
                            {"up_to": None, "per_million": "1"},
                        ],
                    }
                }
            },
            "plans[0].overage.tiers.steps[1].up_to",
        ),
        (
            {"overage": {"tiers": {"mode": "volume", "unit": "tokens", "steps": [{"up_to": None, "multiplier": "1"}]}}},
            "plans[0].overage.tiers.steps[0]",
        ),
    ],
)
def test_defects_are_rejected_naming_the_field(over: dict, field: str) -> None:
    with pytest.raises(PlanFileError) as exc:
        catalog(plan(**over))
    assert exc.value.field == field, exc.value.message


def test_whole_file_defects() -> None:
    with pytest.raises(PlanFileError, match="duplicate key"):
        load_plan_catalog("currency: USD\ncurrency: EUR\nplans: []\n")
    with pytest.raises(PlanFileError, match="duplicate of plans"):
        catalog(plan(), plan())
    with pytest.raises(PlanFileError, match="before"):
        catalog(plan(), plan(version=2, effective_from="2025-01-01T00:00:00Z"))
    with pytest.raises(PlanFileError, match="ISO 4217"):
        catalog(plan(), currency="usd")
    with pytest.raises(PlanFileError, match="non-empty list"):
        load_plan_catalog({"currency": "USD", "plans": []})
    with pytest.raises(PlanFileError, match="duplicate key"):
        load_plan_catalog('{"currency": "USD", "currency": "EUR", "plans": []}')


def test_disjoint_scopes_by_class_or_model_are_fine() -> None:
    cat = catalog(
        plan(
            allowances=[
                {"id": "in", "tokens": 5, "token_classes": ["input"]},
                {
                    "id": "out",
                    "tokens": 5,
                    "token_classes": ["output"],
                    "models": [{"provider": "openai", "model": "a"}],
                },
                {
                    "id": "out-b",
                    "tokens": 5,
                    "token_classes": ["output"],
                    "models": [{"provider": "openai", "model": "b"}],
                },
            ]
        )
    )
    v = cat.versions[0]
    assert v.allowance_for("openai", "b", "output").id == "out-b"
    assert v.allowance_for("openai", "c", "output") is None


def test_ids_and_currency_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(PlanFileError, match="id"):
        catalog(plan(id="pro\n"))
    with pytest.raises(PlanFileError, match="ISO 4217"):
        catalog(plan(), currency="USD\n")
