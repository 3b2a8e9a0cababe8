"""Benchmark 1: the pricing core alone, against litellm and tokencost, in this process.

Same events for all three, ~20 models that all three know. Every engine prices with its OWN
price table (meterline: a price book imported from litellm's map with
:func:`meterline.core.pricing.import_litellm`; litellm: ``litellm.model_cost``; tokencost:
``tokencost.TOKEN_COSTS``). Correctness is judged against the exact Decimal cost computed from
the same engine's table: ``Σ tokens × Decimal(repr(rate per token))``. A peer's float result is
read through its shortest repr (the most generous reading); "inexact" counts events whose cost
differs from exact at all, "mismatched" those off by more than one part in 10^9 (a semantic
difference, not float noise — expected 0).

Token classes used: input, output and, for OpenAI models (whose caching semantics litellm and
tokencost share: prompt tokens include cached reads), cached reads. litellm gets
``prompt_tokens = input + cached`` and ``cache_read_input_tokens = cached``.
"""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import Any

from bench import BenchConfig, Result, median

NAME = "pricing-core"
BATCH = 500
PICOS = 10**12

# Candidates (litellm / tokencost key names); those missing from either table, or not priceable by
# one of the three, are dropped and reported. The list mixes providers and prices that differ
# between the two peers' tables.
CANDIDATES: tuple[str, ...] = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4-turbo",
    "gpt-4",
    "gpt-3.5-turbo",
    "o1",
    "o3-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "anthropic.claude-3-5-sonnet-20241022-v2:0",
    "anthropic.claude-3-5-haiku-20241022-v1:0",
    "anthropic.claude-3-opus-20240229-v1:0",
    "anthropic.claude-3-7-sonnet-20250219-v1:0",
    "meta.llama3-1-70b-instruct-v1:0",
    "meta.llama3-1-405b-instruct-v1:0",
    "amazon.nova-pro-v1:0",
    "amazon.nova-lite-v1:0",
    "mistral/mistral-large-latest",
    "deepseek-chat",
    "command-r-08-2024",
)


def _peers() -> tuple[Any, Any]:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before the import, or litellm goes online
    import litellm
    import tokencost

    litellm.suppress_debug_info = True
    return litellm, tokencost


def _dec(x: Any) -> Decimal:
    return Decimal(repr(x)) if isinstance(x, float) else Decimal(x)


def _exact(table: dict[str, Any], key: str, inp: int, out: int, cached: int) -> Decimal:
    e = table[key]
    total = _dec(e["input_cost_per_token"]) * inp + _dec(e["output_cost_per_token"]) * out
    if cached:
        total += _dec(e["cache_read_input_token_cost"]) * cached
    return total


def select_models(litellm: Any, tokencost: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The usable models (name, provider, model in meterline, cached?) and why others were skipped."""
    from meterline.core.pricing import import_litellm

    lt, tc = litellm.model_cost, tokencost.TOKEN_COSTS
    chosen: list[dict[str, Any]] = []
    skipped: list[str] = []
    for key in CANDIDATES:
        if key not in lt or key not in tc:
            skipped.append(f"{key}: not in both tables")
            continue
        provider = lt[key]["litellm_provider"]
        _, report = import_litellm({key: lt[key]}, effective_from=datetime(2024, 1, 1, tzinfo=UTC))
        if not report.imported:
            skipped.append(f"{key}: meterline import skipped it ({report.skipped[0][1]})")
            continue
        cached = provider == "openai" and all(t[key].get("cache_read_input_token_cost") for t in (lt, tc))
        try:
            litellm.cost_per_token(model=key, prompt_tokens=10, completion_tokens=10, custom_llm_provider=provider)
            tokencost.calculate_cost_by_tokens(10, key, "input")
        except Exception as exc:
            skipped.append(f"{key}: a peer cannot price it ({type(exc).__name__})")
            continue
        model = key[len(provider) + 1 :] if key.startswith(provider + "/") else key
        chosen.append({"key": key, "provider": provider, "model": model, "cached": cached})
    return chosen, skipped


def make_events(models: list[dict[str, Any]], n: int, seed: int = 11) -> list[dict[str, Any]]:
    from meterline.core.pricing._model import EXTRA_FIELDS

    rng = random.Random(seed)
    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        m = models[rng.randrange(len(models))]
        inp = int(rng.lognormvariate(6.5, 1.2)) + 1
        cached = int(inp * rng.random()) if m["cached"] and rng.random() < 0.3 else 0
        out.append(
            {
                "key": m["key"],
                "provider": m["provider"],
                "model": m["model"],
                "model_version": None,
                "occurred_at": now - i,
                "customer_id": f"cust-{i % 1000:04d}",
                "input_tokens": inp,
                "output_tokens": int(rng.lognormvariate(5.0, 1.0)) + 1,
                "cached_input_tokens": cached,
                "cache_write_tokens": 0,
                "reasoning_tokens": 0,
                "requests": 1,
                # Shaped as the UsageEvent v2 decoder hands records to the agent: every field
                # present (a dict without them takes the engine's per-field fallback path).
                **dict.fromkeys(EXTRA_FIELDS, 0),
                "service_tier": None,
            }
        )
    return out


def run(cfg: BenchConfig) -> list[Result]:
    from meterline.core.pricing import PricingEngine, import_litellm, load_price_book

    try:
        litellm, tokencost = _peers()
    except ImportError as exc:
        return [
            Result(
                NAME,
                "pricing core",
                None,
                note=f"skipped: peers not installed ({exc}); pip install tokencost==0.1.26 litellm==1.110.2",
            )
        ]
    models, skipped = select_models(litellm, tokencost)
    events = make_events(models, cfg.pricing_events)
    lt_events = events[: cfg.litellm_events]
    doc, _ = import_litellm(
        {m["key"]: litellm.model_cost[m["key"]] for m in models},
        effective_from=datetime(2024, 1, 1, tzinfo=UTC),
    )
    engine = PricingEngine.from_book(load_price_book(doc))
    price = engine.price
    tc_cost = tokencost.calculate_cost_by_tokens
    lt_cost = litellm.cost_per_token

    def run_meterline(evs: list[dict[str, Any]]) -> list[int]:
        return [price(e).cost_picos for e in evs]

    def batched(fn: Any) -> Any:
        # 500-event batches as the pricing agent gets them (here of mixed customers and models).
        def run(evs: list[dict[str, Any]]) -> list[int]:
            out: list[int] = []
            for i in range(0, len(evs), BATCH):
                out += [a.cost_picos for a in fn(evs[i : i + BATCH])]
            return out

        return run

    run_meterline_many = batched(engine.price_many)
    run_meterline_batch = batched(engine.price_batch)

    def run_tokencost(evs: list[dict[str, Any]]) -> list[Decimal]:
        out = []
        for e in evs:
            c = tc_cost(e["input_tokens"], e["key"], "input") + tc_cost(e["output_tokens"], e["key"], "output")
            if e["cached_input_tokens"]:
                c += tc_cost(e["cached_input_tokens"], e["key"], "cached")
            out.append(c)
        return out

    def run_litellm(evs: list[dict[str, Any]]) -> list[float]:
        out = []
        for e in evs:
            p, c = lt_cost(
                model=e["key"],
                prompt_tokens=e["input_tokens"] + e["cached_input_tokens"],
                completion_tokens=e["output_tokens"],
                cache_read_input_tokens=e["cached_input_tokens"],
                custom_llm_provider=e["provider"],
            )
            out.append(p + c)
        return out

    rates: dict[str, list[float]] = {
        "meterline": [],
        "meterline_many": [],
        "meterline_batch": [],
        "tokencost": [],
        "litellm": [],
    }
    results: dict[str, list[Any]] = {}
    plan = (
        ("meterline", run_meterline, events),
        ("meterline_many", run_meterline_many, events),
        ("meterline_batch", run_meterline_batch, events),
        ("tokencost", run_tokencost, events),
        ("litellm", run_litellm, lt_events),
    )
    for _ in range(cfg.runs):  # interleaved, so drift (thermal, noisy neighbours) hits all three alike
        for name, fn, evs in plan:
            t0 = time.perf_counter()
            results[name] = fn(evs)
            rates[name].append(len(evs) / (time.perf_counter() - t0))

    lt_table, tc_table = litellm.model_cost, tokencost.TOKEN_COSTS
    with localcontext() as ctx:
        ctx.prec = 60  # the reference must not round
        exact_lt = [
            _exact(lt_table, e["key"], e["input_tokens"], e["output_tokens"], e["cached_input_tokens"]) for e in events
        ]
        exact_tc = [
            _exact(tc_table, e["key"], e["input_tokens"], e["output_tokens"], e["cached_input_tokens"]) for e in events
        ]
        m_wrong = sum(1 for got, ex in zip(results["meterline"], exact_lt) if Decimal(got) != ex * PICOS)
        b_wrong = sum(1 for got, ex in zip(results["meterline_batch"], exact_lt) if Decimal(got) != ex * PICOS)
        many_wrong = sum(1 for got, ex in zip(results["meterline_many"], exact_lt) if Decimal(got) != ex * PICOS)
        judged = {"tokencost": (results["tokencost"], exact_tc), "litellm": (results["litellm"], exact_lt)}
        wrong: dict[str, tuple[int, int, Decimal]] = {}
        for name, (got_list, ex_list) in judged.items():
            inexact = mismatched = 0
            worst = Decimal(0)
            for got, ex in zip(got_list, ex_list):
                g = _dec(got)
                if g != ex:
                    inexact += 1
                    rel = abs(g - ex) / ex if ex else abs(g)
                    worst = max(worst, rel)
                    if rel > Decimal("1e-9"):
                        mismatched += 1
            wrong[name] = (inexact, mismatched, worst)
    price_diff = sum(
        1
        for m in models
        if any(
            _dec(lt_table[m["key"]].get(f) or 0) != _dec(tc_table[m["key"]].get(f) or 0)
            for f in ("input_cost_per_token", "output_cost_per_token")
        )
    )

    med = {k: median(v) for k, v in rates.items()}
    ratio_tc = med["meterline"] / med["tokencost"]
    ratio_batch = med["meterline_batch"] / med["tokencost"]
    ratio_many = med["meterline_many"] / med["tokencost"]
    ratio_lt = med["meterline"] / med["litellm"]
    common = {
        "models": [m["key"] for m in models],
        "skipped_models": skipped,
        "models_priced_differently_by_the_two_peers": price_diff,
        "runs": cfg.runs,
        "events": len(events),
        "litellm_events": len(lt_events),
        "rates_per_run": rates,
    }
    n_models = len(models)
    return [
        Result(
            NAME,
            f"meterline PricingEngine.price ({n_models} models)",
            round(med["meterline"]),
            "events/s",
            note=f"median of {cfg.runs} runs x {len(events):,} events",
            details=common,
        ),
        Result(
            NAME,
            "tokencost calculate_cost_by_tokens",
            round(med["tokencost"]),
            "events/s",
            note=f"2-3 calls per event; same {len(events):,} events",
        ),
        Result(
            NAME,
            "litellm cost_per_token",
            round(med["litellm"]),
            "events/s",
            note=f"first {len(lt_events):,} of the same events (it is slow)",
        ),
        Result(NAME, "speed-up vs tokencost", round(ratio_tc, 2), "x", ">= 5x", ratio_tc >= 5),
        Result(
            NAME,
            f"meterline PricingEngine.price_many ({BATCH}-event batches; the pricing agent's path)",
            round(med["meterline_many"]),
            "events/s",
            note=f"median of {cfg.runs}; {many_wrong} of {len(events):,} events wrong vs exact",
        ),
        Result(
            NAME,
            "batch (price_many) speed-up vs tokencost",
            round(ratio_many, 2),
            "x",
            ">= 5x, exact",
            ratio_many >= 5 and many_wrong == 0,
            "batches mix customers and models (each event its own customer of 1,000, one of the models)",
        ),
        Result(
            NAME,
            f"meterline PricingEngine.price_batch ({BATCH}-event batches, numpy int64 columns)",
            round(med["meterline_batch"]),
            "events/s",
            note=f"median of {cfg.runs}; {b_wrong} of {len(events):,} events wrong vs exact",
        ),
        Result(
            NAME,
            "batch (price_batch) speed-up vs tokencost",
            round(ratio_batch, 2),
            "x",
            ">= 5x, exact",
            ratio_batch >= 5 and b_wrong == 0,
            "numpy columns built from the decoded dicts (not wired into the agent: see docs/benchmarks.md)",
        ),
        Result(NAME, "speed-up vs litellm", round(ratio_lt, 1), "x"),
        Result(
            NAME,
            "meterline events wrong vs exact",
            m_wrong,
            "events",
            "0 (exact)",
            m_wrong == 0,
            note=f"of {len(events):,}; integer picos vs Decimal from litellm's table",
        ),
        Result(
            NAME,
            "tokencost events wrong vs exact",
            wrong["tokencost"][0],
            "events",
            note=f"of {len(events):,}; {wrong['tokencost'][1]} off by >1e-9 relative",
            details={"worst_relative_error": str(wrong["tokencost"][2])},
        ),
        Result(
            NAME,
            "litellm events wrong vs exact",
            wrong["litellm"][0],
            "events",
            note=f"of {len(lt_events):,}; float; {wrong['litellm'][1]} off by >1e-9 relative, "
            f"worst {float(wrong['litellm'][2]):.1e}",
            details={"worst_relative_error": str(wrong["litellm"][2])},
        ),
    ]
