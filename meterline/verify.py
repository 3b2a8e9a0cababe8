"""``meterline verify``: a bounded chaos session that proves nothing is lost and nothing is double-charged.

The invariant (pricing part; see docs/invariants.md)::

    Σ accepted events produced (distinct ids) + Σ bad inputs  =  rows(usage_priced) + rows(usage_rejected)
    per customer: Σ cost, Σ charge, count in usage_priced     =  an independent exact Decimal expectation
    usage_hourly / usage_daily                                =  the raw sums of usage_priced, exactly

and it must hold after SIGKILLed workers, replayed / duplicated input, hostile records and a
ClickHouse outage. The pieces are public so the test suite (``tests/invariants``) drives the same
harness as the CLI:

* :class:`Expected` — the oracle. It never calls :mod:`meterline.pricing`: cost is
  ``Σ tokens × per-million rate / 10^6`` in plain :class:`~decimal.Decimal`, charge is
  ``cost × (1 + markup_pct / 100)``, from :data:`RATES` / :data:`MARKUP_PCT` (the numbers of
  ``infra/prices/seed.yaml``).
* :data:`PRICING_CHECKS` — functions ``(query, expected) -> list[Delta]``. Credits / Stripe sync add
  their own checks of the same shape (e.g. "Σ grants − Σ debits = balance", "Σ meter events =
  Σ charge") and pass ``checks=PRICING_CHECKS + (...)`` to :func:`check_invariants`.
* :class:`FlakyClickHouse` — the sink's client factory, with a switch that makes ClickHouse
  unreachable (every call and the factory raise) until restored.
* :class:`ChaosStack` — broker topics + faust worker processes + sink thread on one chDB database.

:func:`run_verify` runs the session and returns a :class:`VerifyReport`; :func:`verify_command` is
the typer command the CLI mounts as ``meterline verify`` (exit 1 on any Δ).
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal, Inexact, localcontext
from pathlib import Path
from typing import Any, Optional

from meterline.config import Settings

__all__ = [
    "CUSTOMERS",
    "MARKUP_PCT",
    "PRICING_CHECKS",
    "RATES",
    "ChaosStack",
    "Delta",
    "Expected",
    "FlakyClickHouse",
    "InvariantCheck",
    "VerifyReport",
    "check_invariants",
    "hostile_records",
    "make_events",
    "price_file",
    "run_verify",
    "verify_command",
]

log = logging.getLogger(__name__)

# (provider, model, model_version) -> per-million list prices (seed.yaml's numbers, as text).
RATES: dict[tuple[str, str, str | None], dict[str, str]] = {
    ("openai", "gpt-4o", None): {"input": "5.00", "output": "15.00", "cached_input": "2.50"},
    ("openai", "o1", None): {"input": "15.00", "output": "60.00", "cached_input": "7.50"},
    ("anthropic", "claude-3-5-sonnet", "20241022"): {"input": "3.00", "output": "15.00", "cached_input": "0.30",
                                                      "cache_write": "3.75"},
    ("google", "gemini-1.5-pro", None): {"input": "3.50", "output": "10.50", "cached_input": "0.875"},
    ("meta", "llama-3-70b", None): {"input": "0.59", "output": "0.79"},
    ("mistral", "mixtral-8x22b", None): {"input": "1.20", "output": "1.20"},
}  # fmt: skip
MARKUP_PCT: dict[str, str] = {"acme": "20", "globex": "7.5"}
CUSTOMERS: tuple[str, ...] = ("acme", "globex", "initech", "umbrella", "hooli", "cüstomer-ünïcode-✓")
_MILLION = Decimal(1_000_000)
_EXACT = Context(prec=80, traps=[Inexact])  # the oracle raises rather than round
Query = Callable[[str], list[tuple[Any, ...]]]


def price_file() -> dict[str, Any]:
    """:data:`RATES` / :data:`MARKUP_PCT` as a price-file mapping (``load_price_book`` input)."""
    prices = []
    for (provider, model, version), rates in RATES.items():
        entry: dict[str, Any] = {"provider": provider, "model": model, "effective_from": "2024-01-01T00:00:00Z",
                                 "per_million": dict(rates)}  # fmt: skip
        if version is not None:
            entry["model_version"] = version
        prices.append(entry)
    cards = [{"customer_id": "*", "markup_pct": "0"}]
    cards += [{"customer_id": c, "markup_pct": pct} for c, pct in MARKUP_PCT.items()]
    return {"currency": "USD", "prices": prices, "rate_cards": cards}


# --------------------------------------------------------------------------- the oracle


@dataclass(frozen=True, slots=True)
class Delta:
    """One way the stored data differs from the expectation."""

    check: str
    subject: str
    expected: str
    observed: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.subject}: expected {self.expected}, observed {self.observed}"


@dataclass
class Expected:
    """What the stores must hold, computed independently of meterline.pricing.

    ``priced`` maps ``(customer_id, event_id)`` to ``(cost, charge)``; adding the same id twice is a
    no-op (a duplicate must not change any total). ``rejected`` counts hostile records / events that
    must each become exactly one ``usage_rejected`` row.
    """

    priced: dict[tuple[str, str], tuple[Decimal, Decimal]] = field(default_factory=dict)
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @staticmethod
    def cost_of(ev: Any) -> Decimal:
        with localcontext(_EXACT):
            return Expected._cost_of(ev)

    @staticmethod
    def _cost_of(ev: Any) -> Decimal:
        rates = {k: Decimal(v) for k, v in RATES[(ev.provider, ev.model, ev.model_version)].items()}
        out_rate = rates["output"]
        total = Decimal(ev.input_tokens) * rates["input"] + Decimal(ev.output_tokens) * out_rate
        total += Decimal(ev.reasoning_tokens) * rates.get("reasoning", out_rate)
        if ev.cached_input_tokens:
            total += Decimal(ev.cached_input_tokens) * rates["cached_input"]
        if ev.cache_write_tokens:
            total += Decimal(ev.cache_write_tokens) * rates["cache_write"]
        return total / _MILLION

    @staticmethod
    def charge_of(customer_id: str, cost: Decimal) -> Decimal:
        with localcontext(_EXACT):
            return cost * (1 + Decimal(MARKUP_PCT.get(customer_id, "0")) / 100)

    def add_priced(self, events: Iterable[Any]) -> None:
        for ev in events:
            cost = self.cost_of(ev)
            self.priced.setdefault((ev.customer_id, ev.event_id), (cost, self.charge_of(ev.customer_id, cost)))

    def add_rejected(self, reason_code: str, n: int = 1) -> None:
        self.rejected += n
        self.rejected_reasons[reason_code] += n

    def per_customer(self) -> dict[str, tuple[int, Decimal, Decimal]]:
        out: dict[str, list[Any]] = defaultdict(lambda: [0, Decimal(0), Decimal(0)])
        with localcontext(_EXACT):
            for (customer, _), (cost, charge) in self.priced.items():
                t = out[customer]
                t[0] += 1
                t[1] += cost
                t[2] += charge
        return {c: (n, cost, charge) for c, (n, cost, charge) in out.items()}


InvariantCheck = Callable[[Query, Expected], list[Delta]]


def _norm(d: Decimal | int | None) -> Decimal:
    return Decimal(0) if d is None else Decimal(d)


def priced_totals_check(query: Query, expected: Expected) -> list[Delta]:
    """Per customer: row count, Σ cost, Σ charge of usage_priced (raw, no FINAL) = the oracle; no
    duplicate and no missing (customer_id, event_id)."""
    deltas: list[Delta] = []
    rows = query("SELECT customer_id, count(), uniqExact(event_id), sum(cost), sum(charge) FROM usage_priced "
                 "GROUP BY customer_id")  # fmt: skip
    got = {str(c): (int(n), int(u), _norm(cost), _norm(charge)) for c, n, u, cost, charge in rows}
    want = expected.per_customer()
    for customer in sorted(set(got) | set(want)):
        n, u, cost, charge = got.get(customer, (0, 0, Decimal(0), Decimal(0)))
        wn, wcost, wcharge = want.get(customer, (0, Decimal(0), Decimal(0)))
        if n != u:
            deltas.append(Delta("no_double_rows", customer, f"{u} rows (one per event)", f"{n} rows"))
        for what, w, g in (("events", wn, u), ("cost", _norm(wcost), cost), ("charge", _norm(wcharge), charge)):
            if w != g:
                deltas.append(Delta("priced_totals", f"{customer} {what}", str(w), f"{g} (Δ {g - w})"))
    if deltas:  # name a few missing / unexpected ids to make the failure actionable
        stored = {(str(c), str(e)) for c, e in query("SELECT customer_id, event_id FROM usage_priced")}
        missing = sorted(set(expected.priced) - stored)[:5]
        extra = sorted(stored - set(expected.priced))[:5]
        if missing:
            deltas.append(Delta("priced_ids", "missing", "present", repr(missing)))
        if extra:
            deltas.append(Delta("priced_ids", "unexpected", "absent", repr(extra)))
    return deltas


def rejected_count_check(query: Query, expected: Expected) -> list[Delta]:
    """Every hostile record / invalid event is exactly one usage_rejected row with a reason_code."""
    n, empty = query("SELECT count(), countIf(reason_code = '') FROM usage_rejected")[0]
    deltas = []
    if int(n) != expected.rejected:
        deltas.append(Delta("rejected_rows", "usage_rejected", str(expected.rejected), str(n)))
    if int(empty):
        deltas.append(Delta("rejected_rows", "reason_code", "never empty", f"{empty} empty"))
    return deltas


_RAW_BY = ("SELECT customer_id, model, {bucket} AS b, count(), sum(cost), sum(charge), sum(input_tokens), "
           "sum(output_tokens) FROM usage_priced GROUP BY customer_id, model, b ORDER BY customer_id, model, b")
_ROLLUP_BY = ("SELECT customer_id, model, {name} AS b, sum(events), sum(cost), sum(charge), sum(input_tokens), "
              "sum(output_tokens) FROM {table} GROUP BY customer_id, model, b ORDER BY customer_id, model, b")  # fmt: skip


def rollup_check(query: Query, expected: Expected) -> list[Delta]:
    """usage_hourly / usage_daily (materialized views) equal the raw sums of usage_priced, exactly."""
    deltas = []
    for table, name, bucket in (("usage_hourly", "hour", "toStartOfHour(toDateTime(occurred_at, 'UTC'))"),
                                ("usage_daily", "day", "toDate(occurred_at, 'UTC')")):  # fmt: skip
        raw = [tuple(r) for r in query(_RAW_BY.format(bucket=bucket))]
        rolled = [tuple(r) for r in query(_ROLLUP_BY.format(name=name, table=table))]
        if raw != rolled:
            diff = sorted(set(rolled) ^ set(raw), key=repr)[:3]
            deltas.append(Delta("rollups", table, f"{len(raw)} groups equal to raw sums", f"differs: {diff}"))
    return deltas


PRICING_CHECKS: tuple[InvariantCheck, ...] = (priced_totals_check, rejected_count_check, rollup_check)


def check_invariants(query: Query, expected: Expected, checks: Sequence[InvariantCheck] = PRICING_CHECKS) -> list[Delta]:
    """Run every check; an empty list means the invariant holds."""
    return [d for check in checks for d in check(query, expected)]


# --------------------------------------------------------------------------- inputs


def make_events(rng: random.Random, n: int, *, now: datetime | None = None, prefix: str = "") -> list[Any]:
    """``n`` valid UsageEvents over :data:`CUSTOMERS` and :data:`RATES`, occurred in the last ~3 hours."""
    from schemas.models import UsageEvent

    now = now or datetime.now(timezone.utc)
    models = list(RATES)
    out = []
    for _ in range(n):
        provider, model, version = rng.choice(models)
        rates = RATES[(provider, model, version)]
        out.append(UsageEvent(
            event_id=f"{prefix}{uuid.UUID(int=rng.getrandbits(128))}",
            occurred_at=now - timedelta(seconds=rng.randint(60, 3 * 3600), milliseconds=rng.randint(0, 999)),
            customer_id=rng.choice(CUSTOMERS), project=rng.choice(["alpha", "beta", None]), feature="chat",
            provider=provider, model=model, model_version=version,
            input_tokens=rng.randint(0, 200_000), output_tokens=rng.randint(1, 8_000),
            reasoning_tokens=rng.randint(0, 4_000) if model == "o1" else 0,
            cached_input_tokens=rng.randint(0, 50_000) if "cached_input" in rates else 0,
            cache_write_tokens=rng.randint(0, 9_999) if "cache_write" in rates else 0,
        ))  # fmt: skip
    return out


def hostile_records(rng: random.Random, now_ms: int, *, tag: str = "") -> list[tuple[bytes | None, bytes, str, int]]:
    """Raw ``usage-events`` records a broken or hostile producer could send.

    Each item is ``(key, value, expected_reason_code, dead_letters)``: the record must end as that
    many ``usage_rejected`` rows carrying that reason (the reason of the first, for mixed records).
    """
    from schemas.codec import MAGIC, encode_usage_batch
    from schemas.registry import default_registry

    def ev(i: int, **over: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"event_id": f"hostile-{tag}{i}", "occurred_at": now_ms - 60_000, "customer_id": "hooli",
                             "provider": "openai", "model": "gpt-4o", "input_tokens": 10, "output_tokens": 5}  # fmt: skip
        d.update(over)
        return d

    good = encode_usage_batch([ev(0)])
    unknown_fp = next(fp for fp in (bytes(rng.getrandbits(8) for _ in range(8)) for _ in range(100))
                      if not _known(default_registry(), fp))  # fmt: skip
    return [
        (b"hooli", good[: len(good) // 2], "undecodable", 1),  # truncated
        (None, b"\x00" + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))), "not_single_object", 1),
        (b"hooli", MAGIC + unknown_fp + good[10:], "unknown_schema", 1),  # wrong fingerprint
        (b"hooli", good + b"\x00", "undecodable", 1),  # trailing bytes
        (b"hooli", b"", "not_single_object", 1),  # Kafka hands an empty value over as b""
        (b"hooli", encode_usage_batch([ev(1, input_tokens=-5)]), "negative_count", 1),
        (b"hooli", encode_usage_batch([ev(2, output_tokens=2**62)]), "absurd_count", 1),
        (b"hooli", encode_usage_batch([ev(3, input_tokens=0, output_tokens=0, requests=0)]), "empty_usage", 1),
        (b"hooli", encode_usage_batch([ev(4, occurred_at=0)]), "timestamp_too_old", 1),  # 1970
        (b"hooli", encode_usage_batch([ev(5, occurred_at=32_503_680_000_000)]), "timestamp_in_future", 1),  # 2999
        (b"hooli", encode_usage_batch([ev(6, model="gpt-7-preview")]), "unknown_model", 1),
        (b"hooli", encode_usage_batch([ev(7, labels={f"k{i}": "v" for i in range(5000)})]), "too_many_labels", 1),
        (b"hooli", encode_usage_batch([ev(8, event_id="")]), "missing_event_id", 1),
        (b"hooli", encode_usage_batch([ev(9, customer_id="x" * 4000)]), "id_too_long", 1),
        (b"hooli", encode_usage_batch([ev(10, model="NaN", provider="nan")]), "unknown_model", 1),
    ]


def _known(registry: Any, fp: bytes) -> bool:
    from meterline.errors import SchemaError

    try:
        registry.get(fp)
    except SchemaError:
        return False
    return True


# --------------------------------------------------------------------------- the stack


class _Outage(ConnectionError):
    pass


class FlakyClickHouse:
    """A zero-argument client factory for :class:`~pipeline.sink.ClickHouseSink` with an outage switch.

    Every client it hands out is a view of ONE real client, serialised by one lock (embedded chDB
    must not be driven from two threads at once). While :meth:`go_down` is in force the factory and
    every call on a handed-out view raise :class:`ConnectionError`; :meth:`restore` ends the outage.
    :meth:`down_after_next_insert` lets exactly one insert land and then fails everything (the
    "insert done, crash before commit" path). :meth:`query` is the observer's own path: never down.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.lock = threading.RLock()
        self._down = threading.Event()
        self._arm_after_insert = False
        self.refused = 0
        self.outages = 0

    def __call__(self) -> _GuardedClient:
        self._check()
        return _GuardedClient(self)

    @property
    def down(self) -> bool:
        return self._down.is_set()

    def go_down(self) -> None:
        if not self._down.is_set():
            self.outages += 1
        self._down.set()

    def down_after_next_insert(self) -> None:
        self._arm_after_insert = True

    def restore(self) -> None:
        self._arm_after_insert = False
        self._down.clear()

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.lock:
            return list(self.client.query(sql, parameters=parameters).result_rows)

    def _check(self) -> None:
        if self._down.is_set():
            self.refused += 1
            raise _Outage("injected ClickHouse outage")


class _GuardedClient:
    def __init__(self, owner: FlakyClickHouse) -> None:
        self._owner = owner

    def query(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.lock:
            self._owner._check()
            return self._owner.client.query(*args, **kwargs)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.lock:
            self._owner._check()
            result = self._owner.client.insert(*args, **kwargs)
            if self._owner._arm_after_insert:
                self._owner._arm_after_insert = False
                self._owner.go_down()
            return result

    def command(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.lock:
            self._owner._check()
            return self._owner.client.command(*args, **kwargs)

    def close(self) -> None:  # the shared client belongs to the FlakyClickHouse owner
        pass


class ChaosStack:
    """Workers, a sink and a producer around one broker + one migrated ClickHouse database.

    ``settings`` must carry ``kafka_bootstrap`` and a ``topic_prefix`` whose topics exist.
    ``sink_cls`` may be a :class:`~pipeline.sink.ClickHouseSink` subclass (crash hooks).
    """

    def __init__(self, settings: Settings, client: Any, log_dir: Path) -> None:
        from pipeline.publish import control_producer
        from schemas.producer import UsageProducer

        assert settings.kafka_bootstrap, "ChaosStack needs settings.kafka_bootstrap"
        self.settings = settings
        self.bootstrap: str = settings.kafka_bootstrap
        self.ch = FlakyClickHouse(client)
        self.log_dir = log_dir
        self.workers: list[Any] = []
        self.sink: Any = None
        self._sink_stop = threading.Event()
        self._sink_thread: threading.Thread | None = None
        self.sink_errors: list[BaseException] = []
        self.producer = UsageProducer(self.bootstrap, settings.topic("usage-events"), linger_ms=5)
        self.raw_producer = control_producer(self.bootstrap)
        self._n = 0
        self.kills = 0

    # -- pieces
    def publish_prices(self, source: Any = None) -> None:
        from meterline.pricing import load_price_book
        from pipeline.publish import publish_records

        book = load_price_book(source if source is not None else price_file())
        publish_records(self.bootstrap, self.settings.topic("prices"), book.to_records())

    def start_sink(self, sink_cls: Any = None, **kwargs: Any) -> Any:
        from pipeline.sink import ClickHouseSink

        cls = sink_cls or ClickHouseSink
        self._sink_stop = threading.Event()
        opts: dict[str, Any] = {"max_interval_ms": 200, "backoff_initial_ms": 50, "backoff_max_ms": 500}
        opts.update(kwargs)
        self.sink = cls(self.bootstrap, f"{self.settings.topic_prefix}sink", self.settings.topic("usage-priced"),
                        self.settings.topic("usage-dead-letter"), self.ch, **opts)  # fmt: skip
        sink, stop = self.sink, self._sink_stop

        def run() -> None:
            try:
                sink.run(stop)
            except BaseException as exc:  # noqa: BLE001 - a crashed sink is a scenario, recorded for the test
                self.sink_errors.append(exc)

        self._sink_thread = threading.Thread(target=run, name="chaos-sink", daemon=True)
        self._sink_thread.start()
        return self.sink

    def sink_alive(self) -> bool:
        return self._sink_thread is not None and self._sink_thread.is_alive()

    def stop_sink(self, timeout: float = 20.0) -> None:
        self._sink_stop.set()
        if self._sink_thread is not None:
            self._sink_thread.join(timeout)

    def start_worker(self) -> Any:
        from pipeline.workers import WorkerProcess

        w = WorkerProcess(self.settings, name=f"worker-{self._n}", log_dir=self.log_dir).start()
        self._n += 1
        self.workers.append(w)
        return w

    def kill_worker(self, worker: Any) -> None:
        worker.kill()
        self.kills += 1

    def produce(self, events: Sequence[Any], flush: bool = True) -> None:
        for e in events:
            self.producer.send(e)
        if flush:
            self.producer.flush(30)

    def produce_raw(self, records: Iterable[tuple[bytes | None, bytes]]) -> None:
        topic = self.settings.topic("usage-events")
        failures: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for key, value in records:
            self.raw_producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        if self.raw_producer.flush(30) or failures:
            raise RuntimeError(f"raw produce failed: {failures[:3]}")

    # -- observing
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return self.ch.query(sql, parameters)

    def counts(self) -> tuple[int, int]:
        priced = self.query("SELECT count() FROM usage_priced")[0][0]
        rejected = self.query("SELECT count() FROM usage_rejected")[0][0]
        return int(priced), int(rejected)

    def dead_workers(self) -> list[str]:
        """Workers that exited by themselves (not by our SIGKILL), with their log tails."""
        return [f"{w.name} exited {w.proc.returncode}:\n{w.log_tail()}" for w in self.workers
                if w.proc is not None and w.proc.poll() not in (None, -9)]  # fmt: skip

    def wait_settled(self, expected: Expected, timeout: float = 120.0, quiet: float = 1.0) -> bool:
        """Wait until both tables hold at least what ``expected`` says and stayed unchanged ``quiet`` s."""
        deadline = time.monotonic() + timeout
        want = (len(expected.priced), expected.rejected)
        last: tuple[int, int] | None = None
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            dead = self.dead_workers()
            if dead:
                raise RuntimeError("a worker crashed: " + "\n".join(dead))
            now = self.counts()
            if now != last:
                last, stable_since = now, time.monotonic()
            elif now[0] >= want[0] and now[1] >= want[1] and time.monotonic() - stable_since >= quiet:
                if self.sink is None or (self.sink.buffered == 0 and not self.sink.degraded):
                    return True
            time.sleep(0.2)
        return False

    def wait_progress(self, above: int, timeout: float = 90.0) -> int:
        """Wait until usage_priced holds more than ``above`` rows; return the count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.counts()[0]
            if n > above:
                return n
            dead = self.dead_workers()
            if dead:
                raise RuntimeError("a worker crashed: " + "\n".join(dead))
            time.sleep(0.1)
        raise TimeoutError(f"no progress past {above} priced rows in {timeout}s")

    def close(self) -> None:
        for w in self.workers:
            w.stop(timeout=5)
        self.stop_sink()
        try:
            self.producer.close(10)
        except Exception as exc:  # noqa: BLE001 - closing on the way out
            log.warning("producer close: %s", exc)
        self.raw_producer.flush(5)


# --------------------------------------------------------------------------- the session


@dataclass
class VerifyReport:
    seed: int
    events_produced: int = 0
    distinct_events: int = 0
    duplicates_injected: int = 0
    bad_inputs: int = 0
    kills_survived: int = 0
    outages_injected: int = 0
    priced_rows: int = 0
    rejected_rows: int = 0
    per_customer: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)  # expected, observed charge
    deltas: list[Delta] = field(default_factory=list)
    settled: bool = False

    @property
    def ok(self) -> bool:
        return self.settled and not self.deltas

    def render(self) -> str:
        lines = [
            f"meterline verify (seed {self.seed})",
            f"  events produced      {self.events_produced} ({self.distinct_events} distinct)",
            f"  duplicates injected  {self.duplicates_injected}",
            f"  bad inputs tried     {self.bad_inputs}",
            f"  kills survived       {self.kills_survived}",
            f"  outages injected     {self.outages_injected}",
            f"  usage_priced rows    {self.priced_rows}",
            f"  usage_rejected rows  {self.rejected_rows}",
            "  customer                     expected charge        observed charge        Δ",
        ]
        for c, (want, got) in sorted(self.per_customer.items()):
            lines.append(f"  {c:<28} {want:>22} {got:>22} {format(got - want, 'f')}")
        if not self.settled:
            lines.append("  NOT SETTLED: the stores did not reach the expected counts in time")
        lines += [f"  Δ {d}" for d in self.deltas]
        lines.append("  RESULT: " + ("OK, every Δ is 0" if self.ok else "FAILED"))
        return "\n".join(lines)


def run_verify(
    settings: Settings,
    *,
    events: int = 3000,
    kills: int = 2,
    duplicates: int = 300,
    outages: int = 1,
    hostile: bool = True,
    seed: int | None = None,
    timeout: float = 180.0,
    echo: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Run a bounded chaos session on its own embedded stack and return the figures.

    Always starts its OWN Tansu broker (memory only) and topics under a fresh prefix. ClickHouse is
    ``settings.clickhouse_dsn`` if set (e.g. a test's database in the process's one chDB engine),
    else a new chDB path under a temporary directory (removed afterwards). Steps: publish prices,
    start the sink (with :class:`FlakyClickHouse`) and one worker; produce ``events`` in
    ``kills + 1`` chunks with ``duplicates`` resends and the hostile records spread over them;
    SIGKILL + restart the worker after each of the first ``kills`` chunks while it is working;
    take ClickHouse down for ``outages`` periods; then wait until the stores settle and check the
    invariant.
    """
    from meterline.stack.broker import TansuBroker
    from meterline.stack.clickhouse import apply_migrations, connect
    from meterline.stack.topics import ensure_topics

    say = echo or (lambda s: log.info(s))
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    report = VerifyReport(seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix="meterline-verify-"))
    prefix = f"verify{uuid.uuid4().hex[:8]}."
    dsn = settings.clickhouse_dsn or f"chdb://{tmp / 'chdb'}"
    broker = TansuBroker(log_dir=tmp).start()
    stack: ChaosStack | None = None
    client = None
    try:
        run_settings = settings.model_copy(update={
            "kafka_bootstrap": broker.bootstrap, "broker_flavor": "tansu", "topic_prefix": prefix,
            "data_dir": tmp, "clickhouse_dsn": dsn,
        })  # fmt: skip
        ensure_topics(broker.bootstrap, prefix, run_settings.partitions)
        client = connect(dsn)
        apply_migrations(client)
        stack = ChaosStack(run_settings, client, tmp / "logs")
        expected = Expected()
        say(f"seed {seed}: broker {broker.bootstrap}, ClickHouse {dsn}")
        stack.publish_prices()
        stack.start_sink()
        worker = stack.start_worker()

        all_events = make_events(rng, events)
        now_ms = time.time_ns() // 1_000_000
        bad = hostile_records(rng, now_ms) if hostile else []
        chunks = [all_events[i::kills + 1] for i in range(kills + 1)]
        bad_chunks = [bad[i::kills + 1] for i in range(kills + 1)]
        outage_at = {rng.randrange(kills + 1) for _ in range(outages)} if outages else set()
        produced: list[Any] = []
        for i, chunk in enumerate(chunks):
            if i in outage_at:
                say(f"chunk {i}: ClickHouse outage")
                stack.ch.go_down()
            n_dups = duplicates // (kills + 1) + (1 if i < duplicates % (kills + 1) else 0)
            pool = produced + chunk
            dups = [rng.choice(pool) for _ in range(n_dups)] if pool else []
            stack.produce(chunk + dups)
            stack.produce_raw((k, v) for k, v, _, _ in bad_chunks[i])
            for _, _, reason, n in bad_chunks[i]:
                expected.add_rejected(reason, n)
            produced += chunk
            expected.add_priced(chunk)
            report.events_produced += len(chunk) + len(dups)
            report.duplicates_injected += len(dups)
            report.bad_inputs += len(bad_chunks[i])
            if i in outage_at:  # hold the outage until the sink has really hit it (bounded)
                refused_before, until = stack.ch.refused, time.monotonic() + 30
                while stack.ch.refused < refused_before + 2 and time.monotonic() < until:
                    time.sleep(0.1)
                time.sleep(rng.uniform(0.2, 1.0))
                stack.ch.restore()
                say(f"chunk {i}: ClickHouse restored after {stack.ch.refused - refused_before} refused calls")
            if i < kills:
                before = stack.counts()[0]
                if before < len(expected.priced):  # kill while this chunk is being priced
                    stack.wait_progress(before, timeout=90)
                time.sleep(rng.uniform(0.0, 0.3))
                say(f"chunk {i}: SIGKILL {worker.name} (pid {worker.pid})")
                stack.kill_worker(worker)
                worker = stack.start_worker()
        report.outages_injected = stack.ch.outages
        report.distinct_events = len(expected.priced)
        say("waiting for the stores to settle")
        report.settled = stack.wait_settled(expected, timeout=timeout)
        report.kills_survived = stack.kills if report.settled else 0
        report.deltas = check_invariants(stack.query, expected)
        report.priced_rows, report.rejected_rows = stack.counts()
        observed = {str(c): Decimal(ch) for c, ch in stack.query(
            "SELECT customer_id, sum(charge) FROM usage_priced GROUP BY customer_id")}  # fmt: skip
        want = expected.per_customer()
        for c in sorted(set(observed) | set(want)):
            report.per_customer[c] = (want.get(c, (0, Decimal(0), Decimal(0)))[2], observed.get(c, Decimal(0)))
        return report
    finally:
        if stack is not None:
            stack.close()
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing on the way out
                pass
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def verify_command(
    events: int = 3000,
    kills: int = 2,
    duplicates: int = 300,
    outages: int = 1,
    seed: Optional[int] = None,  # noqa: UP007 - typer reads the annotation at runtime
) -> None:
    """Chaos-check this build: kill workers, replay, inject bad input and a ClickHouse outage; every Δ must be 0.

    Mount with ``app.command("verify")(verify_command)``; typer reads the parameters as options.
    """
    import typer

    settings = Settings().model_copy(update={"clickhouse_dsn": None})  # never write into a configured ClickHouse
    report = run_verify(settings, events=events, kills=kills, duplicates=duplicates, outages=outages, seed=seed,
                        echo=lambda s: typer.echo(f"  · {s}"))  # fmt: skip
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(1)
