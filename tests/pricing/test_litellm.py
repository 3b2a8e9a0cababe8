from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from meterline.core.errors import PriceFileError
from meterline.core.pricing import PricingEngine, import_litellm, load_price_book

FIXTURE = Path(__file__).parent / "fixtures" / "litellm_sample.json"
EFF = datetime(2025, 1, 1, tzinfo=UTC)


def test_import_fixture() -> None:
    doc, report = import_litellm(FIXTURE, effective_from=EFF)
    assert report.source == str(FIXTURE)
    assert report.imported == (
        "anthropic/claude-3-haiku-20240307",
        "groq/llama3-70b-8192",
        "mistral/open-mistral-nemo",
        "openai/gpt-4o",
        "openai/o1",
        "text-completion-openai/gpt-3.5-turbo-instruct",
    )
    skipped = dict(report.skipped)
    assert set(skipped) == {
        "sample_spec",
        "text-embedding-3-small",
        "free-model-without-costs",
        "tiny-rate-model",
        "dall-e-3",
    }
    assert "embedding" in skipped["text-embedding-3-small"]
    assert "no input_cost_per_token" in skipped["free-model-without-costs"]
    assert "6 decimal" in skipped["tiny-rate-model"] and "input_cost_per_token" in skipped["tiny-rate-model"]

    by_name = {(p["provider"], p["model"]): p for p in doc["prices"]}
    raw = json.loads(FIXTURE.read_text())
    # independent expectation: Decimal of the float's shortest repr × 10**6
    for (prov, model), entry in by_name.items():
        key = model if model in raw else f"{prov}/{model}"
        assert Decimal(entry["per_million"]["input"]) == Decimal(repr(raw[key]["input_cost_per_token"])) * 10**6
        assert entry["effective_from"] == "2025-01-01T00:00:00Z"
    assert by_name[("openai", "gpt-4o")]["per_million"] == {"input": "2.5", "output": "10", "cached_input": "1.25"}
    assert by_name[("mistral", "open-mistral-nemo")]["per_million"] == {"input": "0.15", "output": "0.15"}
    assert by_name[("anthropic", "claude-3-haiku-20240307")]["per_million"] == {
        "input": "0.25",
        "output": "1.25",
        "cached_input": "0.03",
        "cache_write": "0.3",
    }
    assert by_name[("openai", "o1")]["per_million"]["reasoning"] == "60"

    # the result is a loadable, priceable price file
    engine = PricingEngine.from_book(load_price_book(doc))
    got = engine.price(
        {
            "provider": "mistral",
            "model": "open-mistral-nemo",
            "model_version": None,
            "occurred_at": 1_740_000_000_000,
            "customer_id": "c",
            "input_tokens": 3,
            "output_tokens": 0,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "requests": 1,
        }
    )
    assert Decimal(got.cost_picos) / 10**12 == Decimal(3) * Decimal("1.5e-07")


def test_import_from_dict_with_provider_filter_is_deterministic() -> None:
    raw = json.loads(FIXTURE.read_text())
    a, ra = import_litellm(raw, effective_from=EFF, providers={"openai"})
    b, _ = import_litellm(dict(reversed(list(raw.items()))), effective_from=EFF, providers={"openai"})
    assert a == b
    assert ra.imported == ("openai/gpt-4o", "openai/o1")
    assert dict(ra.skipped)["groq/llama3-70b-8192"] == "provider 'groq' not selected"


def test_import_without_litellm_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # litellm is a test extra now: hide it, the lookup must say so, not import anything
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litellm" else real(name, *a))
    with pytest.raises(PriceFileError, match="litellm is not installed"):
        import_litellm(None, effective_from=EFF)


def test_import_rejects_naive_effective_from() -> None:
    with pytest.raises(PriceFileError):
        import_litellm(FIXTURE, effective_from=datetime(2025, 1, 1))
