"""Import list prices from LiteLLM's ``model_prices_and_context_window*.json`` into a price file.

LiteLLM states prices as JSON floats per token (``2.5e-06``). Each is converted through its
shortest repr — ``Decimal(repr(x))`` — and scaled by 10**6 to a per-million rate; no binary
float arithmetic happens. What cannot be imported exactly is skipped and reported, never
approximated. The result is a plain price-file dict (see ``docs/pricing.md``), which can be
reviewed, written to YAML and loaded with :func:`load_price_book`.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterline.core.errors import PriceFileError
from meterline.core.pricing._book import MAX_NAME_LEN, load_price_book
from meterline.core.pricing._model import canon, format_timestamp, parse_timestamp, per_million_to_picos

IMPORTED_MODES = frozenset({"chat", "completion"})
# LiteLLM per-token field -> meterline token class.
FIELD_MAP: dict[str, str] = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "cache_creation_input_token_cost": "cache_write",
    "output_cost_per_reasoning_token": "reasoning",
}


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What an import took and what it left out (``(litellm key, reason)``), both sorted."""

    source: str
    imported: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def find_litellm_json() -> Path:
    """The price JSON inside an installed ``litellm`` package (found without importing it)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise PriceFileError(
            "litellm is not installed; pass the path of model_prices_and_context_window.json", field="source"
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("model_prices_and_context_window*.json"))
        if found:
            return found[0]
    raise PriceFileError("the installed litellm package has no model_prices_and_context_window*.json", field="source")


def _per_token_to_per_million(x: Any) -> Decimal:
    """Exact per-million Decimal of a LiteLLM per-token number; ValueError if not usable."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{x!r} is not a number")
    d = Decimal(repr(x)) if isinstance(x, float) else Decimal(x)
    if not d.is_finite() or d < 0:
        raise ValueError(f"{x!r} is not a finite non-negative number")
    return d.scaleb(6)


def import_litellm(
    source: Path | Mapping[str, Any] | None,
    *,
    effective_from: datetime,
    providers: set[str] | None = None,
) -> tuple[dict[str, Any], ImportReport]:
    """Convert a LiteLLM price map into a price-file dict (currency USD) and a report.

    ``source``: a path to the JSON, the already-parsed dict, or ``None`` to use the installed
    ``litellm`` package's copy. Every imported entry gets ``effective_from``; ``provider`` is
    LiteLLM's ``litellm_provider`` and ``model`` is the map key without a ``<provider>/`` prefix.
    ``providers`` restricts the import to those ``litellm_provider`` values.
    Skipped: ``sample_spec``, modes other than chat/completion, entries without input or output
    cost, and entries with any rate needing more than 6 decimals per million.
    """
    eff = format_timestamp(parse_timestamp(effective_from, where="effective_from"))
    label = "<dict>"
    if source is None:
        source = find_litellm_json()
    if isinstance(source, Path):
        label = str(source)
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PriceFileError(f"cannot read LiteLLM price map {source}: {exc}", field="source") from None
    else:
        data = source
    if not isinstance(data, Mapping):
        raise PriceFileError("LiteLLM price map: expected a JSON object", field="source")

    prices: dict[tuple[str, str], dict[str, Any]] = {}
    owner: dict[tuple[str, str], str] = {}
    skipped: list[tuple[str, str]] = []
    for key in sorted(data):
        entry = data[key]
        if key == "sample_spec":
            skipped.append((key, "documentation entry, not a model"))
            continue
        if not isinstance(entry, Mapping):
            skipped.append((key, "not an object"))
            continue
        provider = entry.get("litellm_provider")
        if not isinstance(provider, str) or not provider:
            skipped.append((key, "no litellm_provider"))
            continue
        if providers is not None and provider not in providers:
            skipped.append((key, f"provider {provider!r} not selected"))
            continue
        mode = entry.get("mode")
        if mode not in IMPORTED_MODES:
            skipped.append((key, f"mode {mode!r} is not chat/completion"))
            continue
        if entry.get("input_cost_per_token") is None or entry.get("output_cost_per_token") is None:
            skipped.append((key, "no input_cost_per_token/output_cost_per_token"))
            continue
        per_million: dict[str, str] = {}
        problem = None
        for fld, cls in FIELD_MAP.items():
            if entry.get(fld) is None:
                continue
            try:
                d = _per_token_to_per_million(entry[fld])
                per_million_to_picos(d, where=f"{fld} = {entry[fld]!r}/token, per million")
            except PriceFileError as exc:
                problem = exc.message
                break
            except ValueError as exc:
                problem = f"{fld}: {exc}"
                break
            per_million[cls] = canon(d)
        if problem:
            skipped.append((key, problem))
            continue
        model = key[len(provider) + 1 :] if key.startswith(provider + "/") else key
        if not model or len(model) > MAX_NAME_LEN or model != model.strip():
            skipped.append((key, "model name is empty, too long or padded"))
            continue
        if (provider, model) in prices:
            skipped.append((key, f"duplicate of {owner[(provider, model)]!r}"))
            continue
        owner[(provider, model)] = key
        prices[(provider, model)] = {
            "provider": provider,
            "model": model,
            "effective_from": eff,
            "per_million": per_million,
        }

    doc = {"currency": "USD", "prices": [prices[k] for k in sorted(prices)]}
    if doc["prices"]:
        load_price_book(doc)  # the import must always produce a loadable file
    report = ImportReport(
        source=label,
        imported=tuple(sorted(f"{p}/{m}" for p, m in prices)),
        skipped=tuple(sorted(skipped)),
    )
    return doc, report
