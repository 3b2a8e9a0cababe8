"""The plan catalog and subscription timelines as the credit agent sees them (no Kafka here).

:class:`PlanBook` is the ``RecordSink`` a :class:`pipeline.pricefeed.PriceFeed` on the compacted
``plans`` topic drains into (every worker reads the whole catalog, like prices). Timelines are
folded from a customer's stored subscription facts with the current catalog, and cached by
(facts, catalog version): the fold is pure, so the cache only saves time.
"""

from __future__ import annotations

from collections import OrderedDict

from meterline.core.plans import LivePlan, PlanCatalog, Timeline, catalog_from_records, fold_timeline

TIMELINE_CACHE = 4096


class PlanBook:
    def __init__(self, records: dict[str, bytes | None] | None = None) -> None:
        self.records: dict[str, bytes | None] = dict(records or {})
        self.version = 0
        self._catalog: PlanCatalog | None = None
        self._timelines: OrderedDict[tuple[str, tuple[str, ...], int], Timeline] = OrderedDict()

    @classmethod
    def of(cls, catalog: PlanCatalog) -> PlanBook:
        """A book holding ``catalog`` (tests, the pure replay)."""
        return cls(dict(catalog.to_records()))

    def apply_record(self, key: str, value: bytes | None) -> None:
        if self.records.get(key, b"") == value:
            return
        self.records[key] = value
        self.version += 1
        self._catalog = None

    @property
    def catalog(self) -> PlanCatalog:
        if self._catalog is None:
            self._catalog = catalog_from_records(self.records.items())
        return self._catalog

    def timeline(self, customer_id: str, live: LivePlan) -> Timeline:
        key = (customer_id, live.facts_key(), self.version)
        hit = self._timelines.get(key)
        if hit is not None:
            self._timelines.move_to_end(key)
            return hit
        tl = fold_timeline(customer_id, live.events(), self.catalog)
        self._timelines[key] = tl
        while len(self._timelines) > TIMELINE_CACHE:
            self._timelines.popitem(last=False)
        return tl
