"""Re-rating in ClickHouse: the rate segments (:mod:`jobs.reprice.rates`) as an inline ``values()``
table, joined to ``usage_priced`` and aggregated there; only aggregates come back to Python.

Arithmetic: the new cost / charge of an event is ``Σ toInt128(count) × rate`` in integer picos
(Int128), summed in Int128 and turned into ``Decimal(38, 12)`` once per group by
``toDecimal128(toString(picos), 0) × 0.000000000001`` (a scale change, exact; ClickHouse has
no direct Int128 → Decimal cast). Old amounts are the
stored ``Decimal(38, 12)`` sums. No float anywhere.

"As billed so far" = ``usage_priced`` + every earlier correction (``usage_corrections``) of the
same customer × hour × provider × model × model_version × project × feature × currency (the
correction key). A delta is ``re-rated − as billed so far`` per key, so applying the same
re-rating twice finds nothing left to correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from jobs.reprice.rates import RATE_FIELDS, Segment, all_segments
from meterline.errors import InputError
from meterline.pricing import PricingEngine

__all__ = ["Filters", "KeyDelta", "ModelLine", "Plan", "plan_reprice"]

KEY_COLUMNS = ("customer_id", "hour", "provider", "model", "model_version", "project", "feature", "currency")
_PICO = "CAST('0.000000000001' AS Decimal(38, 12))"


@dataclass(frozen=True, slots=True)
class Filters:
    start: int  # unix seconds, whole hour
    end: int  # exclusive, whole hour
    customer: str | None = None
    provider: str | None = None
    model: str | None = None

    def where(self, table_alias: str = "") -> tuple[str, dict[str, Any]]:
        a = f"{table_alias}." if table_alias else ""
        params: dict[str, Any] = {"rp_start": datetime.fromtimestamp(self.start, timezone.utc),
                                  "rp_end": datetime.fromtimestamp(self.end, timezone.utc)}  # fmt: skip
        parts = [f"{a}occurred_at >= {{rp_start:DateTime64(3)}}", f"{a}occurred_at < {{rp_end:DateTime64(3)}}"]
        if self.customer is not None:
            parts.append(f"{a}customer_id = {{rp_customer:String}}")
            params["rp_customer"] = self.customer
        if self.provider is not None:
            parts.append(f"{a}provider = {{rp_provider:String}}")
            params["rp_provider"] = self.provider
        if self.model is not None:
            parts.append(f"{a}model = {{rp_model:String}}")
            params["rp_model"] = self.model
        return " AND ".join(parts), params


@dataclass(frozen=True, slots=True)
class ModelLine:
    """One customer × model × (old version, card) → (new version, card) line of the report."""

    customer_id: str
    provider: str
    model: str
    old_version: str
    old_card: str
    new_version: str
    new_card: str
    unpriceable_reason: str  # why these events cannot be re-rated now ('' = they are)
    events: int
    unpriceable: int
    old_cost: Decimal
    old_charge: Decimal
    new_cost: Decimal
    new_charge: Decimal


@dataclass(frozen=True, slots=True)
class KeyDelta:
    """One correction row: what the re-rating changes for one correction key."""

    customer_id: str
    hour: datetime
    provider: str
    model: str
    model_version: str
    project: str
    feature: str
    currency: str
    cost: Decimal
    charge: Decimal
    price_versions: str
    rate_cards: str


@dataclass
class Plan:
    filters: Filters
    lines: list[ModelLine] = field(default_factory=list)
    prior: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)  # customer -> Σ corrections (cost, charge)
    deltas: list[KeyDelta] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    def customers(self) -> list[dict[str, Any]]:
        """Per customer: old (as billed so far, earlier corrections included) and new totals."""
        by: dict[str, dict[str, Any]] = {}
        for ln in self.lines:
            c = by.setdefault(ln.customer_id, {"events": 0, "unpriceable": 0, "old_cost": Decimal(0),
                                               "old_charge": Decimal(0), "new_cost": Decimal(0),
                                               "new_charge": Decimal(0), "models": []})  # fmt: skip
            c["events"] += ln.events
            c["unpriceable"] += ln.unpriceable
            c["old_cost"] += ln.old_cost
            c["old_charge"] += ln.old_charge
            c["new_cost"] += ln.new_cost
            c["new_charge"] += ln.new_charge
            c["models"].append(ln)
        out = []
        for cust in sorted(by):
            c = by[cust]
            pc, pch = self.prior.get(cust, (Decimal(0), Decimal(0)))
            out.append({"customer_id": cust, **c, "prior_corrections": pch,
                        "old_cost": c["old_cost"] + pc, "old_charge": c["old_charge"] + pch,
                        "delta": c["new_charge"] - c["old_charge"] - pch,
                        "cost_delta": c["new_cost"] - c["old_cost"] - pc})  # fmt: skip
        return out

    def versions(self) -> tuple[list[str], list[str], list[str], list[str]]:
        """(versions before, versions after, cards before, cards after), sorted and distinct."""
        vb = sorted({x for ln in self.lines for x in ln.old_version.split(",") if x})
        va = sorted({ln.new_version for ln in self.lines if ln.new_version})
        cb = sorted({x for ln in self.lines for x in ln.old_card.split(",") if x})
        ca = sorted({ln.new_card for ln in self.lines if ln.new_card})
        return vb, va, cb, ca


def _q(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _n(v: int | None) -> str:
    return "NULL" if v is None else str(int(v))


def _rates_table(segments: Sequence[Segment]) -> str:
    cols = ["customer_id String", "provider String", "model String", "model_version String", "t_from Int64",
            "t_to Int64", "price_version String", "rate_card String", "error String"]  # fmt: skip
    cols += [f"k{i} Nullable(Int128)" for i in range(len(RATE_FIELDS))]
    cols += [f"c{i} Nullable(Int128)" for i in range(len(RATE_FIELDS))]
    rows = []
    for s in segments:
        cost = s.cost or (None,) * len(RATE_FIELDS)
        charge = s.charge or (None,) * len(RATE_FIELDS)
        vals = [_q(s.customer_id), _q(s.provider), _q(s.model), _q(s.model_version), str(s.t_from_ms), str(s.t_to_ms),
                _q(s.price_version), _q(s.rate_card), _q(s.error)] + [_n(x) for x in cost] + [_n(x) for x in charge]  # fmt: skip
        rows.append("(" + ", ".join(vals) + ")")
    return f"values({_q(', '.join(cols))}, {', '.join(rows)})"


def _events_sql(segments: Sequence[Segment], where: str) -> str:
    """One row per event of the period with its re-rated picos (Int128) and whether it is priceable now."""
    ok = ["r.error = ''"] + [f"(u.{f} = 0 OR r.k{i} IS NOT NULL)" for i, f in enumerate(RATE_FIELDS)]
    cost = " + ".join(f"toInt128(u.{f}) * ifNull(r.k{i}, toInt128(0))" for i, f in enumerate(RATE_FIELDS))
    charge = " + ".join(f"toInt128(u.{f}) * ifNull(r.c{i}, toInt128(0))" for i, f in enumerate(RATE_FIELDS))
    return f"""
        SELECT u.customer_id AS customer_id, toStartOfHour(toDateTime(u.occurred_at, 'UTC')) AS hour,
               u.provider AS provider, u.model AS model, u.model_version AS model_version, u.project AS project,
               u.feature AS feature, u.currency AS currency, u.price_version AS old_version,
               u.rate_card AS old_card, r.price_version AS new_version, r.rate_card AS new_card, r.error AS error,
               u.cost AS old_cost, u.charge AS old_charge, ({' AND '.join(ok)}) AS ok,
               ({cost}) AS new_cost_p, ({charge}) AS new_charge_p
        FROM (SELECT * FROM usage_priced FINAL WHERE {where}) AS u
        INNER JOIN (SELECT * FROM {_rates_table(segments)}) AS r
            ON u.customer_id = r.customer_id AND u.provider = r.provider AND u.model = r.model
               AND u.model_version = r.model_version
        WHERE toUnixTimestamp64Milli(u.occurred_at) >= r.t_from AND toUnixTimestamp64Milli(u.occurred_at) < r.t_to
    """


def _new(picos_col: str, kept_col: str) -> str:
    """Decimal(38, 12) of the re-rated priceable events plus the billed amount of the others."""
    return f"(toDecimal128(toString(sumIf({picos_col}, ok)), 0) * {_PICO} + sumIf({kept_col}, NOT ok))"


def plan_reprice(ch: Any, engine: PricingEngine, filters: Filters, *, with_deltas: bool,
                 progress: Callable[[str, int, int], None] | None = None) -> Plan:  # fmt: skip
    """Re-rate the filtered period with ``engine`` (the catalog now); deltas only if asked (apply)."""
    if filters.start % 3600 or filters.end % 3600:
        raise InputError("the period must start and end on whole UTC hours (corrections are hourly)", field="period")
    where, params = filters.where()
    groups = ch.query(
        f"SELECT customer_id, provider, model, model_version, toUnixTimestamp64Milli(min(occurred_at)), "
        f"toUnixTimestamp64Milli(max(occurred_at)) FROM usage_priced WHERE {where} "
        f"GROUP BY customer_id, provider, model, model_version ORDER BY customer_id, provider, model, model_version",
        parameters=params,
    ).result_rows
    plan = Plan(filters)
    if progress is not None:
        progress("rates", 0, len(groups))
    plan.segments = all_segments(engine, [(str(c), str(p), str(m), str(v), int(lo), int(hi)) for c, p, m, v, lo, hi in groups])
    if progress is not None:
        progress("rates", len(groups), len(groups))
    if not plan.segments:
        return plan
    ev = _events_sql(plan.segments, where)
    if progress is not None:
        progress("re-rating in ClickHouse", 0, 1)
    rows = ch.query(
        f"SELECT customer_id, provider, model, arrayStringConcat(arraySort(groupUniqArray(old_version)), ','), "
        f"arrayStringConcat(arraySort(groupUniqArray(old_card)), ','), new_version, new_card, error, count(), "
        f"countIf(NOT ok), sum(old_cost), sum(old_charge), {_new('new_cost_p', 'old_cost')}, "
        f"{_new('new_charge_p', 'old_charge')} FROM ({ev}) "
        f"GROUP BY customer_id, provider, model, new_version, new_card, error "
        f"ORDER BY customer_id, provider, model, new_version, new_card, error",
        parameters=params,
    ).result_rows
    plan.lines = [ModelLine(str(c), str(p), str(m), str(ov), str(oc), str(nv), str(nc), str(err), int(n), int(bad),
                            Decimal(a), Decimal(b), Decimal(x), Decimal(y))
                  for c, p, m, ov, oc, nv, nc, err, n, bad, a, b, x, y in rows]  # fmt: skip
    for c, cost, charge in ch.query(f"SELECT customer_id, sum(cost), sum(charge) FROM usage_corrections FINAL "
                                    f"WHERE {where} GROUP BY customer_id", parameters=params).result_rows:  # fmt: skip
        plan.prior[str(c)] = (Decimal(cost), Decimal(charge))
    if progress is not None:
        progress("re-rating in ClickHouse", 1, 1)
    if with_deltas:
        keys = ", ".join(KEY_COLUMNS)
        cwhere, _ = filters.where()
        drows = ch.query(
            f"SELECT n.customer_id, n.hour, n.provider, n.model, n.model_version, n.project, n.feature, n.currency, "
            f"n.n_cost - n.o_cost - c.cost AS dcost, n.n_charge - n.o_charge - c.charge AS dcharge, "
            f"n.versions, n.cards FROM ("
            f"  SELECT {keys}, sum(old_cost) AS o_cost, sum(old_charge) AS o_charge, "
            f"  {_new('new_cost_p', 'old_cost')} AS n_cost, {_new('new_charge_p', 'old_charge')} AS n_charge, "
            f"  arrayStringConcat(arraySort(groupUniqArray(if(ok, new_version, ''))), ',') AS versions, "
            f"  arrayStringConcat(arraySort(groupUniqArray(if(ok, new_card, ''))), ',') AS cards "
            f"  FROM ({ev}) GROUP BY {keys}) AS n "
            f"LEFT JOIN (SELECT customer_id, toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour, provider, model, "
            f"  model_version, project, feature, currency, sum(cost) AS cost, sum(charge) AS charge "
            f"  FROM usage_corrections FINAL WHERE {cwhere} GROUP BY {keys}) AS c USING ({keys}) "
            f"WHERE dcost != 0 OR dcharge != 0 ORDER BY {keys}",
            parameters=params, settings={"join_use_nulls": 0},
        ).result_rows  # fmt: skip
        plan.deltas = [KeyDelta(str(r[0]), r[1], str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6]), str(r[7]),
                                Decimal(r[8]), Decimal(r[9]), str(r[10]).strip(","), str(r[11]).strip(","))
                       for r in drows]  # fmt: skip
    return plan
