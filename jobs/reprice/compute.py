"""Re-rating in ClickHouse: the rate segments (:mod:`jobs.reprice.rates`) in an auxiliary Memory
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

import hashlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from jobs.reprice.plans import PlanBill, PlanContext, load_plan_context, rate_plan_bills
from jobs.reprice.rates import Segment, all_segments, rated_fields
from meterline.core.errors import InputError
from meterline.core.pricing import PricingEngine

__all__ = ["Filters", "ModelLine", "Plan", "Repricing", "open_reprice", "plan_reprice"]

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
        params: dict[str, Any] = {
            "rp_start": datetime.fromtimestamp(self.start, UTC),
            "rp_end": datetime.fromtimestamp(self.end, UTC),
        }
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
    plan_events: int = 0  # events inside a plan run: their charge feeds the plan bill (jobs/reprice/plans.py)
    plan_old_charge: Decimal = Decimal(0)
    plan_new_charge: Decimal = Decimal(0)


@dataclass
class Plan:
    filters: Filters
    lines: list[ModelLine] = field(default_factory=list)
    prior: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)  # customer -> Σ corrections (cost, charge)
    segments: list[Segment] = field(default_factory=list)
    plan_bills: list[PlanBill] = field(default_factory=list)  # plan customers' periods, old and new

    def customers(self) -> list[dict[str, Any]]:
        """Per customer: old (as billed so far, earlier corrections included) and new totals.

        For events inside a plan run the charge is the plan bill's (``plan_bills``): their own
        pay-per-token charge stays in the model lines (informational) but not in the totals."""
        by: dict[str, dict[str, Any]] = {}
        bills: dict[str, list[PlanBill]] = {}
        for b in self.plan_bills:
            bills.setdefault(b.customer_id, []).append(b)
        for ln in self.lines:
            c = by.setdefault(
                ln.customer_id,
                {
                    "events": 0,
                    "unpriceable": 0,
                    "old_cost": Decimal(0),
                    "old_charge": Decimal(0),
                    "new_cost": Decimal(0),
                    "new_charge": Decimal(0),
                    "models": [],
                },
            )
            c["events"] += ln.events
            c["unpriceable"] += ln.unpriceable
            c["old_cost"] += ln.old_cost
            c["old_charge"] += ln.old_charge - ln.plan_old_charge
            c["new_cost"] += ln.new_cost
            c["new_charge"] += ln.new_charge - ln.plan_new_charge
            c["models"].append(ln)
        out = []
        for cust in sorted(by):
            c = by[cust]
            pc, pch = self.prior.get(cust, (Decimal(0), Decimal(0)))
            mine = bills.get(cust, [])
            plan_old = sum((Decimal(b.old).scaleb(-12) for b in mine), Decimal(0))
            plan_new = sum((Decimal(b.new).scaleb(-12) for b in mine), Decimal(0))
            out.append(
                {
                    "customer_id": cust,
                    **c,
                    "prior_corrections": pch,
                    "old_cost": c["old_cost"] + pc,
                    "old_charge": c["old_charge"] + pch + plan_old,
                    "new_charge": c["new_charge"] + plan_new,
                    "delta": c["new_charge"] - c["old_charge"] - pch + plan_new - plan_old,
                    "cost_delta": c["new_cost"] - c["old_cost"] - pc,
                    "plan_bills": mine,
                }
            )
        return out

    def versions(self) -> tuple[list[str], list[str], list[str], list[str]]:
        """(versions before, versions after, cards before, cards after), sorted and distinct."""
        vb = sorted({x for ln in self.lines for x in ln.old_version.split(",") if x})
        va = sorted({ln.new_version for ln in self.lines if ln.new_version})
        cb = sorted({x for ln in self.lines for x in ln.old_card.split(",") if x})
        ca = sorted({ln.new_card for ln in self.lines if ln.new_card})
        return vb, va, cb, ca


def _rates_columns(fields: tuple[str, ...]) -> list[tuple[str, str]]:
    cols = [
        ("customer_id", "String"),
        ("provider", "String"),
        ("model", "String"),
        ("model_version", "String"),
        ("service_tier", "String"),
        ("t_from", "Int64"),
        ("t_to", "Int64"),
        ("price_version", "String"),
        ("rate_card", "String"),
        ("error", "String"),
    ]
    cols += [(f"k{i}", "Nullable(Int128)") for i in range(len(fields))]
    cols += [(f"c{i}", "Nullable(Int128)") for i in range(len(fields))]
    return cols


@contextmanager
def _rates_table(ch: Any, segments: Sequence[Segment], fields: tuple[str, ...]) -> Iterator[str]:
    """The segments in an auxiliary Memory table (dropped afterwards): a join target for ClickHouse.
    (An inline ``values()`` literal hits ``max_query_size`` at tens of thousands of segments.)"""
    name = f"reprice_rates_{uuid.uuid4().hex[:12]}"
    cols = _rates_columns(fields)
    ch.command(f"CREATE TABLE {name} ({', '.join(f'{c} {t}' for c, t in cols)}) ENGINE = Memory")
    try:
        n = len(fields)
        rows = [
            [
                s.customer_id,
                s.provider,
                s.model,
                s.model_version,
                s.service_tier,
                s.t_from_ms,
                s.t_to_ms,
                s.price_version,
                s.rate_card,
                s.error,
                *(s.cost or (None,) * n),
                *(s.charge or (None,) * n),
            ]
            for s in segments
        ]
        ch.insert(name, rows, column_names=[c for c, _ in cols])
        yield name
    finally:
        ch.command(f"DROP TABLE IF EXISTS {name}")


def _events_sql(rates: str, where: str, fields: tuple[str, ...]) -> str:
    """One row per event of the period with its re-rated picos (Int128), whether it is priceable now,
    and whether it occurred inside a plan run (``in_plan``: its charge feeds a plan bill)."""
    ok = ["r.error = ''"] + [f"(u.{f} = 0 OR r.k{i} IS NOT NULL)" for i, f in enumerate(fields)]
    cost = " + ".join(f"toInt128(u.{f}) * ifNull(r.k{i}, toInt128(0))" for i, f in enumerate(fields))
    charge = " + ".join(f"toInt128(u.{f}) * ifNull(r.c{i}, toInt128(0))" for i, f in enumerate(fields))
    return f"""
        SELECT u.customer_id AS customer_id, toStartOfHour(toDateTime(u.occurred_at, 'UTC')) AS hour,
               u.provider AS provider, u.model AS model, u.model_version AS model_version, u.project AS project,
               u.feature AS feature, u.currency AS currency, u.price_version AS old_version,
               u.rate_card AS old_card, r.price_version AS new_version, r.rate_card AS new_card, r.error AS error,
               u.cost AS old_cost, u.charge AS old_charge, ({" AND ".join(ok)}) AS ok,
               toUnixTimestamp64Milli(u.occurred_at) AS ms,
               ({PlanContext.in_plan_sql("u.customer_id", "toUnixTimestamp64Milli(u.occurred_at)")}) AS in_plan,
               ({cost}) AS new_cost_p, ({charge}) AS new_charge_p
        FROM (SELECT * FROM usage_priced FINAL WHERE {where}) AS u
        INNER JOIN {rates} AS r
            ON u.customer_id = r.customer_id AND u.provider = r.provider AND u.model = r.model
               AND u.model_version = r.model_version AND u.service_tier = r.service_tier
        WHERE toUnixTimestamp64Milli(u.occurred_at) >= r.t_from AND toUnixTimestamp64Milli(u.occurred_at) < r.t_to
    """


def _new(picos_col: str, kept_col: str, keep: str = "NOT ok") -> str:
    """Decimal(38, 12) of the re-rated events plus the billed amount of those ``keep`` selects
    (by default the events nothing prices now)."""
    return f"(toDecimal128(toString(sumIf({picos_col}, NOT ({keep}))), 0) * {_PICO} + sumIf({kept_col}, {keep}))"


class Repricing:
    """One re-rating with its rate segments loaded (inside :func:`open_reprice`): the report, the
    deltas' summary, and the correction rows written by ClickHouse itself (``INSERT … SELECT``)."""

    def __init__(
        self,
        ch: Any,
        plan: Plan,
        rates: str | None,
        params: dict[str, Any],
        fields: tuple[str, ...],
        plans: PlanContext | None = None,
    ) -> None:
        self.ch = ch
        self.fields = fields
        self.plan = plan
        self.plans = plans or PlanContext()
        self._rates = rates
        self._params = params
        self._staged: str | None = None

    def _stage(self) -> str:
        """The deltas, computed once into an auxiliary Memory table (dropped with the rates)."""
        if self._staged is None:
            name = f"{self._rates}_delta"
            self.ch.command(
                f"CREATE TABLE {name} ENGINE = Memory AS {self._delta_sql()}",
                parameters=self._params,
                settings={"join_use_nulls": 0},
            )
            self._staged = name
        return self._staged

    def drop(self) -> None:
        if self._staged is not None:
            self.ch.command(f"DROP TABLE IF EXISTS {self._staged}")
            self._staged = None

    def _delta_sql(self) -> str:
        assert self._rates is not None
        where, _ = self.plan.filters.where()
        ev = _events_sql(self._rates, where, self.fields)
        keys = ", ".join(KEY_COLUMNS)
        return (
            f"SELECT n.customer_id AS customer_id, n.hour AS hour, n.provider AS provider, n.model AS model, "
            f"n.model_version AS model_version, n.project AS project, n.feature AS feature, n.currency AS currency, "
            f"n.n_cost - n.o_cost - c.cost AS dcost, n.n_charge - n.o_charge - c.charge AS dcharge, "
            f"if(n.v_lo = n.v_hi, n.v_lo, concat(n.v_lo, ',', n.v_hi)) AS versions, "
            f"if(n.c_lo = n.c_hi, n.c_lo, concat(n.c_lo, ',', n.c_hi)) AS cards FROM ("
            f"  SELECT {keys}, sum(old_cost) AS o_cost, sum(old_charge) AS o_charge, "
            f"  {_new('new_cost_p', 'old_cost')} AS n_cost, {_new('new_charge_p', 'old_charge', 'NOT ok OR in_plan')} AS n_charge, "
            f"  minIf(new_version, ok) AS v_lo, maxIf(new_version, ok) AS v_hi, "
            f"  minIf(new_card, ok) AS c_lo, maxIf(new_card, ok) AS c_hi "
            f"  FROM ({ev}) GROUP BY {keys}) AS n "
            f"LEFT JOIN (SELECT customer_id, toStartOfHour(toDateTime(occurred_at, 'UTC')) AS hour, provider, model, "
            f"  model_version, project, feature, currency, sum(cost) AS cost, sum(charge) AS charge "
            f"  FROM usage_corrections FINAL WHERE {where} AND kind = 'usage' GROUP BY {keys}) AS c USING ({keys}) "
            f"WHERE dcost != 0 OR dcharge != 0"
        )

    def report(self, progress: Callable[[str, int, int], None] | None = None) -> Plan:
        """Fill the plan's report lines and the earlier corrections per customer."""
        plan, where = self.plan, self.plan.filters.where()[0]
        if self._rates is None:
            return plan
        if progress is not None:
            progress("re-rating in ClickHouse", 0, 1)
        ev = _events_sql(self._rates, where, self.fields)
        rows = self.ch.query(
            f"SELECT customer_id, provider, model, arrayStringConcat(arraySort(groupUniqArray(old_version)), ','), "
            f"arrayStringConcat(arraySort(groupUniqArray(old_card)), ','), new_version, new_card, error, count(), "
            f"countIf(NOT ok), sum(old_cost), sum(old_charge), {_new('new_cost_p', 'old_cost')}, "
            f"{_new('new_charge_p', 'old_charge')}, countIf(in_plan), sumIf(old_charge, in_plan), "
            f"toDecimal128(toString(sumIf(new_charge_p, ok AND in_plan)), 0) * {_PICO} + sumIf(old_charge, NOT ok AND in_plan) "
            f"FROM ({ev}) GROUP BY customer_id, provider, model, new_version, new_card, error "
            f"ORDER BY customer_id, provider, model, new_version, new_card, error",
            parameters=self._params,
        ).result_rows
        plan.lines = [
            ModelLine(
                str(c),
                str(p),
                str(m),
                str(ov),
                str(oc),
                str(nv),
                str(nc),
                str(err),
                int(n),
                int(bad),
                Decimal(a),
                Decimal(b),
                Decimal(x),
                Decimal(y),
                int(pn),
                Decimal(po),
                Decimal(pnew),
            )
            for c, p, m, ov, oc, nv, nc, err, n, bad, a, b, x, y, pn, po, pnew in rows
        ]
        q = (
            f"SELECT customer_id, sum(cost), sum(charge) FROM usage_corrections FINAL WHERE {where} "
            "AND kind = 'usage' GROUP BY customer_id"
        )
        for c, cost, charge in self.ch.query(q, parameters=self._params).result_rows:
            plan.prior[str(c)] = (Decimal(cost), Decimal(charge))
        if self.plans.bounds:
            if progress is not None:
                progress("plan bills", 0, len(self.plans.bounds))
            bucket = PlanContext.bucket_sql("customer_id", "ms")
            deltas = self.ch.query(
                f"SELECT customer_id, {bucket} AS bk, provider, model, "
                f"toDecimal128(toString(sumIf(new_charge_p, ok)), 0) * {_PICO} - sumIf(old_charge, ok) "
                f"FROM ({ev}) WHERE in_plan GROUP BY customer_id, bk, provider, model",
                parameters=self._params,
            ).result_rows
            plan.plan_bills = rate_plan_bills(self.ch, self.plans, deltas)
            if progress is not None:
                progress("plan bills", len(self.plans.bounds), len(self.plans.bounds))
        if progress is not None:
            progress("re-rating in ClickHouse", 1, 1)
        return plan

    def plan_rows(self) -> list[PlanBill]:
        """The plan periods whose bill (or ledger part) changes: one ``kind = 'plan'`` row each
        (:meth:`report` must have run)."""
        return [b for b in self.plan.plan_bills if b.delta or b.ledger_delta or b.segments_change]

    def delta_summary(self) -> tuple[int, int]:
        """(number of correction rows the re-rating needs, an order-independent fingerprint of them)."""
        if self._rates is None:
            return 0, 0
        row = self.ch.query(
            f"SELECT count(), sum(cityHash64(customer_id, toString(hour), provider, model, model_version, project, "
            f"feature, currency, toString(dcost), toString(dcharge))) FROM {self._stage()}"
        ).result_rows[0]
        n, fingerprint = int(row[0]), int(row[1] or 0)
        for b in self.plan_rows():
            segs = [(c.start, c.plan, sorted(c.used.items()), c.overage, c.invoiced) for c, _, _ in b.segments]
            text = f"plan|{b.customer_id}|{b.start}|{b.stop}|{b.delta}|{b.ledger_delta}" + (f"|{segs}" if segs else "")
            h = hashlib.sha256(text.encode())
            n, fingerprint = n + 1, (fingerprint + int(h.hexdigest()[:15], 16)) % 2**64
        return n, fingerprint

    def insert_corrections(self, correction_id: str, created_at: datetime) -> None:
        """Write the deltas as ``usage_corrections`` rows: the plan periods' rows (kind ``plan``,
        jobs/reprice/plans.py) first, then the per-hour rows, computed and inserted by ClickHouse."""
        if self._rates is None:
            return
        rows = [
            [
                correction_id,
                datetime.fromtimestamp(b.start, UTC),
                datetime.fromtimestamp(b.stop, UTC),
                b.customer_id,
                b.currency,
                Decimal(0),
                Decimal(b.delta).scaleb(-12),
                Decimal(b.ledger_delta).scaleb(-12),
                ",".join(b.plans),
                created_at,
            ]
            for b in self.plan_rows()
        ]
        if rows:
            self.ch.insert(
                "usage_corrections",
                [[*r[:3], "plan", *r[3:]] for r in rows],
                column_names=[
                    "correction_id",
                    "occurred_at",
                    "period_end",
                    "kind",
                    "customer_id",
                    "currency",
                    "cost",
                    "charge",
                    "ledger_charge",
                    "price_version",
                    "created_at",
                ],
            )
        self.ch.command(
            "INSERT INTO usage_corrections (correction_id, occurred_at, customer_id, provider, model, model_version, "
            "project, feature, currency, cost, charge, price_version, rate_card, created_at) "
            "SELECT {rp_cid:String}, hour, customer_id, provider, model, model_version, project, feature, currency, "
            f"dcost, dcharge, versions, cards, {{rp_created:DateTime64(3)}} FROM {self._stage()}",
            parameters={"rp_cid": correction_id, "rp_created": created_at},
            settings={"max_insert_block_size": 10_000_000, "min_insert_block_size_rows": 10_000_000},
        )


@contextmanager
def open_reprice(
    ch: Any, engine: PricingEngine, filters: Filters, progress: Callable[[str, int, int], None] | None = None
) -> Iterator[Repricing]:
    """Load the rate segments of the filtered period (the catalog in ``engine``) next to the data."""
    if filters.start % 3600 or filters.end % 3600:
        raise InputError("the period must start and end on whole UTC hours (corrections are hourly)", field="period")
    where, params = filters.where()
    groups = ch.query(
        f"SELECT customer_id, provider, model, model_version, service_tier, toUnixTimestamp64Milli(min(occurred_at)), "
        f"toUnixTimestamp64Milli(max(occurred_at)) FROM usage_priced WHERE {where} "
        f"GROUP BY customer_id, provider, model, model_version, service_tier "
        f"ORDER BY customer_id, provider, model, model_version, service_tier",
        parameters=params,
    ).result_rows
    plan = Plan(filters)

    def tick(done: int) -> None:
        if progress is not None and (done % 500 == 0 or done == len(groups)):
            progress("rates (customer × model)", done, len(groups))

    fields = rated_fields(ch)
    segments = all_segments(
        engine,
        [(str(c), str(p), str(m), str(v), str(t), int(lo), int(hi)) for c, p, m, v, t, lo, hi in groups],
        fields,
        tick,
    )
    plan.segments = segments
    if not segments:
        yield Repricing(ch, plan, None, params, fields)
        return
    plans = load_plan_context(ch, {str(g[0]) for g in groups}, filters.start, filters.end)
    params = {**params, **plans.params()}
    with _rates_table(ch, segments, fields) as rates:
        rp = Repricing(ch, plan, rates, params, fields, plans)
        try:
            yield rp
        finally:
            rp.drop()


def plan_reprice(
    ch: Any, engine: PricingEngine, filters: Filters, progress: Callable[[str, int, int], None] | None = None
) -> Plan:
    """The dry run: the report only."""
    with open_reprice(ch, engine, filters, progress) as rp:
        return rp.report(progress)
