"""The pricing hot path: a decoded usage record in, exact integer cost and charge out.

Contract of :meth:`PricingEngine.price`:

1. Model lookup: exact ``(provider, model, model_version)``, else ``(provider, model, None)``;
   then the same two with the names normalised by :func:`meterline.core.naming.normalize_model` (the
   function every adapter applies: ``claude-3-5-sonnet-20241022`` → ``claude-3-5-sonnet`` version
   ``20241022``, ``gemini`` → ``google``, ``:online`` dropped). Price entries are reachable under
   their normalised names too. Aliases (exact strings) name the same timeline as their model. A
   model that matches none is ``unknown_model``. (The version-less fallback is used only when the
   exact key has no timeline at all, never to fill a gap in time.) The event's ``service_tier``
   is part of the key: a ``batch`` / ``flex`` / ``priority`` event is priced only by a price entry
   of that tier — without one it is ``no_price_for_service_tier``, never the standard price.
2. Time: the version in force at ``occurred_at`` prices the event — the one with the greatest
   ``effective_from <= occurred_at`` (bisect over epoch ms). Before the first one:
   ``no_price_at_time``. Late events therefore keep the price of their own time.
3. Cost (list price) = Σ tokens(class) × list_picos(class) + requests × request_fee_picos.
   A class with tokens but no rate is ``no_rate_for_token_class`` — never priced at 0; likewise a
   tool call (``web_search_requests``) whose price has no such ``tool_fees`` entry.
4. Charge (customer price) = the same sum over the customer's rates: the customer's card, else
   the ``"*"`` card, else charge = cost. Those rates are resolved once per (customer, price
   version) — see :meth:`RateCard.charge_picos` — and cached.

Everything is integer arithmetic in picos (1e-12 currency units): no float, no rounding.
The record is assumed to have passed event validation (non-negative integer token counts).

:meth:`PricingEngine.price_many` is the batch form of :meth:`PricingEngine.price` (same rules, same
results, errors returned in place instead of raised). It does the lookups once per batch — per
distinct (customer, provider, model, version) the card and the price version, which is the same
for every event of the batch when the batch's whole time range falls inside one price version's
window — and then runs one tight loop of integer arithmetic. Events of a model whose price changes
inside the batch's time range (or that is unknown) go through :meth:`PricingEngine.price` one by one.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import partial
from operator import itemgetter
from typing import Any, NamedTuple

from meterline.core.errors import PriceFileError, UnpriceableEvent
from meterline.core.naming import normalize_model
from meterline.core.pricing._book import CARD_KEY_PREFIX, PRICE_KEY_PREFIX, PriceBook, decode_record
from meterline.core.pricing._model import (
    BASE_CLASSES,
    CLASS_FALLBACK,
    CLASS_TO_FIELD,
    DEFAULT_CARD_ID,
    EXTRA_CLASSES,
    EXTRA_FIELDS,
    EXTRA_RATED,
    NO_CARD,
    TOKEN_CLASSES,
    TOOL_FEES,
    PriceVersion,
    RateCard,
    epoch_ms,
    fee_to_picos,
    format_timestamp,
    per_million_to_picos,
)

# Bound on the (customer, price version) -> rates cache; it is simply cleared when full.
MAX_CACHE_ENTRIES = 1_000_000

_ModelKey = tuple[str, str, "str | None", "str | None"]  # provider, model, model_version, service_tier
_Timeline = tuple[list[int], list[tuple[str, PriceVersion]]]
# (in, out, cached, write, reasoning, fee) list picos, then the same for the charge, then
# currency, version id, card id, then the EXTRA_RATED list picos and charge picos (tuples,
# None = no price).
_Entry = tuple[Any, ...]
_EXTRAS = itemgetter(*EXTRA_FIELDS)
_NO_EXTRAS = (0,) * len(EXTRA_FIELDS)
_EXTRAS_AND_TIER = itemgetter(*EXTRA_FIELDS, "service_tier")
_CLEAN = {(*_NO_EXTRAS, None)}


def _extras_of(record: Mapping[str, Any]) -> tuple[int, ...]:
    """The record's v2 counts (0 for a v1 record that lacks them). A v2 decoder record has every
    field (one C-level itemgetter call); other dicts take the per-field ``get`` path."""
    if "service_tier" in record:
        try:
            return _EXTRAS(record)  # type: ignore[no-any-return]
        except KeyError:
            pass
    return tuple(map(record.get, EXTRA_FIELDS, _NO_EXTRAS))


class PricedAmounts(NamedTuple):
    """The price of one event: list cost and customer charge in integer picos, with provenance."""

    cost_picos: int
    charge_picos: int
    currency: str
    price_version: str
    rate_card: str


_new_tuple = tuple.__new__  # builds a PricedAmounts without the namedtuple's Python-level __new__

# Field extractors of the batch path: one C call per event instead of one subscript per field.
_OCCURRED = itemgetter("occurred_at")
_CUSTOMER = itemgetter("customer_id")
_MODEL = itemgetter("provider", "model", "model_version")
_INT_ONLY = {int}
_COUNTS = itemgetter(
    "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens", "requests"
)
# A loop entry (see PricingEngine._loop_entry) for keys the batch loop cannot price (unknown
# model, no price yet, or a price change inside the batch's time range): such events are priced
# zero by the loop, then replaced by what price() says.
_PER_EVENT: tuple[Any, ...] = (0, 0, 0, 0, 0, 0, None, "", "", "")


class PricingEngine:
    """Prices decoded usage records; built from a :class:`PriceBook` or the ``prices`` topic.

    Not thread-safe (one engine per worker). Updates via :meth:`apply_record` take effect on the
    next :meth:`price` call.
    """

    def __init__(self) -> None:
        self._versions: dict[str, tuple[int, PriceVersion]] = {}  # record key -> (apply seq, version)
        self._cards: dict[str, RateCard] = {}
        self._seq = 0
        self._timelines: dict[_ModelKey, _Timeline] = {}
        # reported (provider, model, version, tier) -> its timeline after normalisation (or None)
        self._resolved: dict[_ModelKey, _Timeline | None] = {}
        self._cache: dict[tuple[str, str], _Entry] = {}
        # price_many's caches: customer -> card id, (card id, version id) -> loop entry.
        self._card_ids: dict[str, str] = {}
        self._loop_cache: dict[tuple[str, str | None], tuple[Any, ...]] = {}
        self._dirty = False

    @classmethod
    def from_book(cls, book: PriceBook) -> PricingEngine:
        engine = cls()
        for v in book.versions:
            engine._put_version(PRICE_KEY_PREFIX + v.version_id, v)
        for c in book.cards:
            engine._cards[c.customer_id] = c
        return engine

    # ------------------------------------------------------------------ updates

    def apply_record(self, key: str, value: bytes | None) -> None:
        """Apply one record of the compacted ``prices`` topic (``None`` = tombstone = delete).

        Idempotent. If two live price records claim the same model and ``effective_from`` (a
        corrected price not yet tombstoned), the one applied last wins; removing it reveals the
        other — the same outcome a replay of the compacted topic gives.
        Raises :class:`PriceFileError` for a malformed record (the engine is left unchanged).
        """
        if value is None:
            if key.startswith(PRICE_KEY_PREFIX):
                if self._versions.pop(key, None) is not None:
                    self._dirty = True
            elif key.startswith(CARD_KEY_PREFIX):
                if self._cards.pop(key[len(CARD_KEY_PREFIX) :], None) is not None:
                    self._forget()
            else:
                raise PriceFileError(f"record {key!r}: unknown key prefix", field=key)
            return
        obj = decode_record(key, value)
        if isinstance(obj, PriceVersion):
            self._put_version(key, obj)
        else:
            self._cards[obj.customer_id] = obj
            self._forget()

    def _put_version(self, key: str, v: PriceVersion) -> None:
        current = self._versions.get(key)
        if current is not None and current[1] == v:
            return
        self._seq += 1
        self._versions[key] = (self._seq, v)
        self._dirty = True

    def _rebuild(self) -> None:
        winners: dict[tuple[str, str, str | None, str | None, int], tuple[int, PriceVersion]] = {}
        for seq, v in self._versions.values():
            slot = (*v.lookup_key, v.effective_ms)
            if slot not in winners or winners[slot][0] < seq:
                winners[slot] = (seq, v)
        grouped: dict[_ModelKey, list[PriceVersion]] = {}
        for _, v in winners.values():
            grouped.setdefault(v.lookup_key, []).append(v)
        timelines: dict[_ModelKey, _Timeline] = {}
        for mk, vs in grouped.items():
            vs.sort(key=lambda x: x.effective_ms)
            timelines[mk] = ([x.effective_ms for x in vs], [(x.version_id, x) for x in vs])
        # Aliases name a model's whole timeline; real model names win, then the first model by name.
        order = sorted(grouped, key=lambda k: (k[0], k[1], k[2] or "", k[3] or ""))
        for mk in order:
            for v in grouped[mk]:
                for alias in v.aliases:
                    timelines.setdefault((mk[0], alias, mk[2], mk[3]), timelines[mk])
        # Every name is also reachable normalised (a file may say "claude-3-5-sonnet-20241022").
        for key in sorted(timelines, key=lambda k: (k[0], k[1], k[2] or "", k[3] or "")):
            timelines.setdefault((*normalize_model(key[0], key[1], key[2]), key[3]), timelines[key])
        self._timelines = timelines
        self._resolved = {}
        self._forget()
        self._dirty = False

    def _forget(self) -> None:
        """Drop every derived cache (after a price or card change)."""
        self._cache.clear()
        self._card_ids.clear()
        self._loop_cache.clear()

    # ------------------------------------------------------------------ lookups

    def timeline(
        self, provider: str, model: str, model_version: str | None, service_tier: str | None = None
    ) -> _Timeline | None:
        """The price timeline of a reported model (rule 1), or None. Memoised per reported key."""
        key = (provider, model, model_version, service_tier)
        try:
            return self._resolved[key]
        except KeyError:
            pass
        t = self._timelines
        tl = t.get(key)
        if tl is None and model_version is not None:
            tl = t.get((provider, model, None, service_tier))
        if tl is None:
            np, nm, nv = normalize_model(provider, model, model_version)
            tl = t.get((np, nm, nv, service_tier))
            if tl is None and nv is not None:
                tl = t.get((np, nm, None, service_tier))
        if len(self._resolved) >= MAX_CACHE_ENTRIES:
            self._resolved.clear()
        self._resolved[key] = tl
        return tl

    def version_at(
        self, provider: str, model: str, model_version: str | None, occurred_at_ms: int, service_tier: str | None = None
    ) -> PriceVersion:
        """The price version that prices an event of this model at this time (rules 1–2 above)."""
        if self._dirty:
            self._rebuild()
        tl = self.timeline(provider, model, model_version, service_tier)
        if tl is None:
            if service_tier is not None and self.timeline(provider, model, model_version) is not None:
                raise UnpriceableEvent(
                    f"{provider}/{model} has no price for service tier {service_tier!r}; refusing to bill it at "
                    "the standard price",
                    reason_code="no_price_for_service_tier",
                    field="service_tier",
                )
            raise UnpriceableEvent(
                f"no price for model {provider}/{model} (version {model_version})",
                reason_code="unknown_model",
                field="model",
            )
        i = bisect_right(tl[0], occurred_at_ms) - 1
        if i < 0:
            first = tl[1][0][1]
            raise UnpriceableEvent(
                f"{provider}/{model}: event at {occurred_at_ms} ms is before the first price "
                f"({format_timestamp(first.effective_from)})",
                reason_code="no_price_at_time",
                field="occurred_at",
            )
        return tl[1][i][1]

    def card_for(self, customer_id: str) -> RateCard:
        """The customer's card, else the ``"*"`` card, else the charge-equals-cost card."""
        return self._cards.get(customer_id) or self._cards.get(DEFAULT_CARD_ID) or NO_CARD

    def keys(self) -> list[str]:
        """The live record keys (for :meth:`PriceBook.superseded_keys`)."""
        return sorted(list(self._versions) + [CARD_KEY_PREFIX + c for c in self._cards])

    def _resolve(self, customer_id: str, v: PriceVersion) -> _Entry:
        card = self.card_for(customer_id)
        cost = v.rates.picos()
        ov = card.override_for(v.provider, v.model, v.model_version)
        extra_cost = v.rates.extra_picos()
        list_picos = dict(zip(BASE_CLASSES, cost[: len(BASE_CLASSES)], strict=True)) | dict(
            zip(EXTRA_CLASSES, extra_cost[: len(EXTRA_CLASSES)], strict=True)
        )
        stated: dict[str, int | None] = {}
        for cls in TOKEN_CLASSES:
            if ov is not None and cls in ov.rates:
                stated[cls] = per_million_to_picos(ov.rates[cls], where=f"rate_cards[{card.customer_id}]")
            elif cls in CLASS_FALLBACK and v.rates.get(cls) is None:
                stated[cls] = None  # follows the customer's rate of the fallback class below
            else:
                p = list_picos[cls]
                stated[cls] = None if p is None else card.charge_picos(p)
        for cls, other in CLASS_FALLBACK.items():
            if stated[cls] is None:
                stated[cls] = stated[other]
        if ov is not None and "request_fee" in ov.rates:
            fee = fee_to_picos(ov.rates["request_fee"], where=f"rate_cards[{card.customer_id}]")
        else:
            fee = card.charge_picos(cost[5])
        charge = (*(stated[c] for c in BASE_CLASSES), fee)
        tool_cost = extra_cost[len(EXTRA_CLASSES) :]
        extra_charge = tuple(stated[c] for c in EXTRA_CLASSES) + tuple(
            None if p is None else card.charge_picos(p) for p in tool_cost
        )
        entry = cost + charge + (v.currency, v.version_id, card.card_id, extra_cost, extra_charge)
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[(customer_id, v.version_id)] = entry
        return entry

    # ------------------------------------------------------------------ hot path

    def price(self, record: Mapping[str, Any]) -> PricedAmounts:
        """Price one decoded usage record (see the module docstring for the rules).

        ``record`` needs provider, model, model_version, occurred_at (epoch ms int, or an aware
        datetime), customer_id and the five ``*_tokens`` counts plus ``requests``.
        Raises :class:`UnpriceableEvent` (reason_code ``unknown_model``, ``no_price_at_time`` or
        ``no_rate_for_token_class``).
        """
        if self._dirty:
            self._rebuild()
        provider = record["provider"]
        model = record["model"]
        mv = record["model_version"]
        tier = record.get("service_tier")
        tl = self._timelines.get((provider, model, mv, tier))  # the exact key: no normalisation needed
        if tl is None:
            tl = self.timeline(provider, model, mv, tier)
            if tl is None:
                return self._price_slow(record)
        ms = record["occurred_at"]
        if type(ms) is not int:
            return self._price_slow(record)
        i = bisect_right(tl[0], ms) - 1
        if i < 0:
            return self._price_slow(record)
        vid, v = tl[1][i]
        customer = record["customer_id"]
        e = self._cache.get((customer, vid))
        if e is None:
            e = self._resolve(customer, v)
        # Inlined copy of _compute (a function call is ~15 % of the budget here).
        ri, ro, rc, rw, rr, rf, ci, co, cc, cw, cr, cf, currency, vid, card, xl, xc = e
        it = record["input_tokens"]
        ot = record["output_tokens"]
        xt = record["reasoning_tokens"]
        n = record["requests"]
        cost = it * ri + ot * ro + xt * rr + n * rf
        charge = it * ci + ot * co + xt * cr + n * cf
        ct = record["cached_input_tokens"]
        if ct:
            if rc is None or cc is None:
                raise _no_rate("cached_input", vid)
            cost += ct * rc
            charge += ct * cc
        wt = record["cache_write_tokens"]
        if wt:
            if rw is None or cw is None:
                raise _no_rate("cache_write", vid)
            cost += wt * rw
            charge += wt * cw
        if tier is not None or "service_tier" not in record:
            extras = _extras_of(record)  # a v1-shaped dict, or a tier: the general path
        else:
            try:
                extras = _EXTRAS(record)  # a v2 decoder record: every field present
            except KeyError:
                extras = _extras_of(record)
        if extras != _NO_EXTRAS:
            cost, charge = _add_extras(cost, charge, extras, xl, xc, vid)
        return _new_tuple(PricedAmounts, (cost, charge, currency, vid, card))

    def price_many(self, records: Sequence[Mapping[str, Any]]) -> list[PricedAmounts | UnpriceableEvent]:
        """Price a batch: element ``i`` equals what ``price(records[i])`` returns, or is the
        :class:`UnpriceableEvent` it raises (returned in place, not raised). Any other exception
        (say a record missing a field) propagates, as from :meth:`price`.

        Fastest when the records share a customer, provider and model version (a ``UsageBatch``),
        but any mix is priced, and priced identically to :meth:`price`.
        """
        if self._dirty:
            self._rebuild()
        if not records:
            return []
        occurred = list(map(_OCCURRED, records))
        if set(map(type, occurred)) != _INT_ONLY:  # datetimes (or garbage): the per-event path decides
            return [self._price_or_error(r) for r in records]
        entries, per_event = self._batch_entries(records, min(occurred), max(occurred))
        # Events with a service tier or v2 classes take the per-event path (same rules as price()).
        # Usually none has any: proven with C-level passes (v2 decoder records have every field).
        try:
            clean = set(map(_EXTRAS_AND_TIER, records)) == _CLEAN
        except KeyError:
            clean = False
        if not clean:
            for i, r in enumerate(records):
                if r.get("service_tier") is not None or _extras_of(r) != _NO_EXTRAS:
                    entries[i] = _PER_EVENT
                    per_event = True

        out: list[Any] = []
        append = out.append
        new = _new_tuple
        pa = PricedAmounts
        for (ri, ro, rc, rw, rr, rf, charge_rates, currency, vid, card), (it, ot, ct, wt, xt, n) in zip(
            entries, map(_COUNTS, records)
        ):
            cost = it * ri + ot * ro
            if xt:
                cost += xt * rr
            if rf:
                cost += n * rf
            if ct:
                if rc is None:
                    append(_no_rate("cached_input", vid))
                    continue
                cost += ct * rc
            if wt:
                if rw is None:
                    append(_no_rate("cache_write", vid))
                    continue
                cost += wt * rw
            if charge_rates is None:  # the customer pays list price
                append(new(pa, (cost, cost, currency, vid, card)))
                continue
            ci, co, cc, cw, cr, cf = charge_rates
            charge = it * ci + ot * co + xt * cr + n * cf
            if ct:
                charge += ct * cc
            if wt:
                charge += wt * cw
            append(new(pa, (cost, charge, currency, vid, card)))

        if per_event:
            for i, e in enumerate(entries):
                if e is _PER_EVENT:
                    out[i] = self._price_or_error(records[i])
        return out

    def price_batch(self, records: Sequence[Mapping[str, Any]]) -> list[PricedAmounts | UnpriceableEvent]:
        """:meth:`price_many`, computed as numpy int64 columns per (card, price version) run.

        Same contract and results as :meth:`price_many`. The counts go into one ``n × 6`` matrix,
        the rates of each run (the loop entries of :meth:`_batch_entries`) into one row per run,
        and cost and charge are two integer dot products per event. Exact: the kernel
        (``_vector.dot_runs``) proves ``Σ max|count| × max|rate| <= 2**63 - 1`` first and
        otherwise the whole batch is priced with Python ints by :meth:`price_many`. Events the
        columns do not cover (unknown model, a price change inside the batch, a service tier,
        v2 classes or tool calls, a missing cached / cache-write rate) go through :meth:`price`.
        """
        # numpy is imported here, not with the module: processes that never price batches this
        # way (the CLI, the API, the jobs) do not pay its import time and memory.
        import numpy as np

        from meterline.core.pricing._vector import MIN_BATCH, count_matrix, dot_runs

        if len(records) < MIN_BATCH:
            return self.price_many(records)
        if self._dirty:
            self._rebuild()
        occurred = list(map(_OCCURRED, records))
        if set(map(type, occurred)) != _INT_ONLY:
            return self.price_many(records)
        counts = count_matrix(records)
        if counts is None:
            return self.price_many(records)
        entries, _ = self._batch_entries(records, min(occurred), max(occurred))
        by_id = {id(e): e for e in entries}  # loop entries are shared objects: one per run
        run_entries = list(by_id.values())
        runs = {k: i for i, k in enumerate(by_id)}
        run_list = list(map(runs.__getitem__, map(id, entries)))
        run_of = np.array(run_list, dtype=np.intp)
        zero = (0, 0, 0, 0, 0, 0)
        cost_rows = [zero if e is _PER_EVENT else (e[0], e[1], e[2] or 0, e[3] or 0, e[4], e[5]) for e in run_entries]
        charge_rows = [
            r if e is _PER_EVENT or e[6] is None else tuple(x or 0 for x in e[6])
            for e, r in zip(run_entries, cost_rows)
        ]
        cost = dot_runs(counts, cost_rows, run_of)
        charge = dot_runs(counts, charge_rows, run_of)
        if cost is None or charge is None:
            return self.price_many(records)  # beyond the int64 bound: Python ints, exact at any size

        # Events for price(): runs the columns do not price, a cached / cache-write count without
        # its rate (the error), a service tier or v2 classes (proven absent with C-level passes).
        per_event = np.array([e is _PER_EVENT for e in run_entries])[run_of]
        per_event |= np.array([e is not _PER_EVENT and e[2] is None for e in run_entries])[run_of] & (counts[:, 2] != 0)
        per_event |= np.array([e is not _PER_EVENT and e[3] is None for e in run_entries])[run_of] & (counts[:, 3] != 0)
        try:
            clean = set(map(_EXTRAS_AND_TIER, records)) == _CLEAN
        except KeyError:
            clean = False
        if not clean:
            for i, r in enumerate(records):
                if r.get("service_tier") is not None or _extras_of(r) != _NO_EXTRAS:
                    per_event[i] = True

        # PricedAmounts by C-level maps: (cost, charge, currency, version, card) per event.
        meta = [("", "", "") if e is _PER_EVENT else (e[7], e[8], e[9]) for e in run_entries]
        fields = zip(
            cost,
            charge,
            map([m[0] for m in meta].__getitem__, run_list),
            map([m[1] for m in meta].__getitem__, run_list),
            map([m[2] for m in meta].__getitem__, run_list),
        )
        out: list[Any] = list(map(partial(_new_tuple, PricedAmounts), fields))
        for i in np.nonzero(per_event)[0].tolist():
            out[i] = self._price_or_error(records[i])
        return out

    def _batch_entries(
        self, records: Sequence[Mapping[str, Any]], lo: int, hi: int
    ) -> tuple[list[tuple[Any, ...]], bool]:
        """The loop entry of every record (all stamped within ``[lo, hi]`` ms), and whether any
        is :data:`_PER_EVENT`. Lookups run once per distinct key; the per-record mapping runs in C
        (``map`` over ``itemgetter`` and ``dict.__getitem__``)."""
        model_keys = list(map(_MODEL, records))
        customers = set(map(_CUSTOMER, records))
        keyed = {mk: self._batch_version(mk[0], mk[1], mk[2], lo, hi) for mk in set(model_keys)}
        if len(customers) == 1:  # the usual UsageBatch: one customer, a handful of models
            (customer,) = customers
            table = {mk: self._loop_entry(customer, vv) for mk, vv in keyed.items()}
            return list(map(table.__getitem__, model_keys)), None in keyed.values()
        vids = {mk: None if vv is None else vv[0] for mk, vv in keyed.items()}
        # customer -> card id and (card id, version id) -> entry are kept across batches (cleared
        # with the rates cache), so a batch of many customers costs C-level lookups per record.
        card_ids = self._card_ids
        missing = customers.difference(card_ids)
        if missing:
            if len(card_ids) + len(missing) > MAX_CACHE_ENTRIES:
                card_ids.clear()
                missing = customers
            for c in missing:
                card_ids[c] = self.card_for(c).card_id
        pairs = list(zip(map(card_ids.__getitem__, map(_CUSTOMER, records)), map(vids.__getitem__, model_keys)))
        loop = self._loop_cache
        todo = set(pairs).difference(loop)
        if todo:
            if len(loop) + len(todo) > MAX_CACHE_ENTRIES:
                loop.clear()
                todo = set(pairs)
            customer_of = {card_ids[c]: c for c in customers}  # _resolve wants a customer of the card
            by_vid = {vv[0]: vv for vv in keyed.values() if vv is not None}
            for cid, vid in todo:
                loop[cid, vid] = self._loop_entry(customer_of[cid], None if vid is None else by_vid[vid])
        return list(map(loop.__getitem__, pairs)), None in vids.values()

    def _batch_version(
        self, provider: str, model: str, mv: str | None, lo: int, hi: int
    ) -> tuple[str, PriceVersion] | None:
        """(version id, version) pricing every event of this model in ``[lo, hi]`` ms, or None
        when that is not one version (unknown model, no price yet, a price change inside)."""
        tl = self.timeline(provider, model, mv)
        if tl is None:
            return None
        i = bisect_right(tl[0], lo) - 1
        if i < 0 or i != bisect_right(tl[0], hi) - 1:
            return None
        return tl[1][i]

    def _loop_entry(self, customer: str, vv: tuple[str, PriceVersion] | None) -> tuple[Any, ...]:
        """``(in, out, cached, write, reasoning, fee)`` list picos — cached/write None when the
        event would be ``no_rate_for_token_class`` — then the charge rates (None when they equal
        the list rates), currency, version id, card id. :data:`_PER_EVENT` for ``vv`` None."""
        if vv is None:
            return _PER_EVENT
        vid, v = vv
        e = self._cache.get((customer, vid)) or self._resolve(customer, v)
        ri, ro, rc, rw, rr, rf, ci, co, cc, cw, cr, cf, currency, vid, card, _xl, _xc = e
        charge = None if e[:6] == e[6:12] else (ci, co, cc, cw, cr, cf)
        rc = None if rc is None or cc is None else rc  # price() refuses if either is missing
        rw = None if rw is None or cw is None else rw
        return (ri, ro, rc, rw, rr, rf, charge, currency, vid, card)

    def _price_or_error(self, record: Mapping[str, Any]) -> PricedAmounts | UnpriceableEvent:
        try:
            return self.price(record)
        except UnpriceableEvent as exc:
            return exc

    def _price_slow(self, record: Mapping[str, Any]) -> PricedAmounts:
        ms = record["occurred_at"]
        if isinstance(ms, datetime):
            ms = epoch_ms(ms)
        elif type(ms) is not int:
            raise UnpriceableEvent(
                f"occurred_at must be epoch ms or a datetime, got {type(ms).__name__}",
                reason_code="no_price_at_time",
                field="occurred_at",
            )
        v = self.version_at(
            record["provider"], record["model"], record["model_version"], ms, record.get("service_tier")
        )
        customer = record["customer_id"]
        e = self._cache.get((customer, v.version_id)) or self._resolve(customer, v)
        return _compute(record, e)


def _add_extras(
    cost: int, charge: int, extras: tuple[int, ...], xl: tuple[int | None, ...], xc: tuple[int | None, ...], vid: str
) -> tuple[int, int]:
    """Add the v2 classes and tool fees; a count without a rate is ``no_rate_for_token_class``."""
    for n, lp, cp, cls in zip(extras, xl, xc, EXTRA_RATED, strict=True):
        if n:
            if lp is None or cp is None:
                raise _no_rate(cls, vid)
            cost += n * lp
            charge += n * cp
    return cost, charge


def _compute(record: Mapping[str, Any], e: _Entry) -> PricedAmounts:
    ri, ro, rc, rw, rr, rf, ci, co, cc, cw, cr, cf, currency, vid, card, xl, xc = e
    it = record["input_tokens"]
    ot = record["output_tokens"]
    xt = record["reasoning_tokens"]
    n = record["requests"]
    cost = it * ri + ot * ro + xt * rr + n * rf
    charge = it * ci + ot * co + xt * cr + n * cf
    ct = record["cached_input_tokens"]
    if ct:
        if rc is None or cc is None:
            raise _no_rate("cached_input", vid)
        cost += ct * rc
        charge += ct * cc
    wt = record["cache_write_tokens"]
    if wt:
        if rw is None or cw is None:
            raise _no_rate("cache_write", vid)
        cost += wt * rw
        charge += wt * cw
    extras = _extras_of(record)
    if extras != _NO_EXTRAS:
        cost, charge = _add_extras(cost, charge, extras, xl, xc, vid)
    return PricedAmounts(cost, charge, currency, vid, card)


def _no_rate(cls: str, vid: str) -> UnpriceableEvent:
    if cls in TOOL_FEES:
        return UnpriceableEvent(
            f"{vid} has no {cls} tool fee but the event has {cls} calls",
            reason_code="no_rate_for_token_class",
            field=CLASS_TO_FIELD[cls],
        )
    return UnpriceableEvent(
        f"{vid} has no {cls} rate but the event has {cls} tokens",
        reason_code="no_rate_for_token_class",
        field=f"{cls}_tokens",
    )
