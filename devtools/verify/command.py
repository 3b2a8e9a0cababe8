"""``meterline verify``: run a bounded chaos session (:func:`run_verify`) and print its report."""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from devtools.verify.credits import _entries_by_customer, credit_checks, plan_credits
from devtools.verify.inputs import hostile_records, make_events
from devtools.verify.oracle import PRICING_CHECKS, Delta, Expected, InvariantCheck, check_invariants
from devtools.verify.stack import ChaosStack
from devtools.verify.stripe_sync import StripeReport, StripeSession
from meterline.core.config import Settings

log = logging.getLogger(__name__)

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
    # credits: customer -> (policy, expected Σ charge, ledger debits + overage, expected status, observed status)
    ledger: dict[str, tuple[str, Decimal, Decimal, str, str]] = field(default_factory=dict)
    stripe: StripeReport | None = None
    deltas: list[Delta] = field(default_factory=list)
    settled: bool = False
    busy_events: int = 0  # oversized input: events of ONE customer in one burst
    big_record_bytes: int = 0  # oversized input: one raw usage record of max-label events
    restarts: int = 0  # restart of everything (broker included, SIGKILL), state restored
    restored_ledgers: int = 0
    balances_kept: bool | None = None  # every balance after the restart equal to before, to the pico

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
            f"  oversized input      {self.busy_events} events of one customer in one burst; "
            f"one {self.big_record_bytes}-byte record of max-label events",
            f"  restart of all       {self.restarts} (broker SIGKILLed; {self.restored_ledgers} ledgers restored, "
            f"balances kept: {self.balances_kept}; all events re-sent after it)",
            f"  usage_priced rows    {self.priced_rows}",
            f"  usage_rejected rows  {self.rejected_rows}",
            "  customer                     expected charge        observed charge        Δ",
        ]
        for c, (want, got) in sorted(self.per_customer.items()):
            lines.append(f"  {c:<28} {want:>22} {got:>22} {format(got - want, 'f')}")
        if self.ledger:
            lines.append("  ledger (debits + overage = Σ charge)  policy        expected charge   ledger Δ  status")
            for c, (policy, want, got, st_want, st_got) in sorted(self.ledger.items()):
                mark = "" if st_want == st_got else f" (expected {st_want})"
                lines.append(f"  {c:<28} {policy:<13} {want:>22} {format(got - want, 'f'):>10}  {st_got}{mark}")
        if self.stripe is not None:
            s = self.stripe
            faults = ", ".join(f"{k}×{v}" for k, v in s.faults.items()) or "none"
            crash = f"after push {s.crashed_after}" if s.crashed_after else "none"
            lines += [
                f"  stripe faults        {faults}",
                f"  stripe sync crash    {crash}; {s.runs} runs, {s.sent} sends, {s.acked} acked by the re-runs, "
                f"{s.retries} own back-offs",
                "  stripe (µ$, closed windows)  expected units         pushed units           Δ",
            ]
            for c, (want_u, got_u) in sorted(s.per_customer.items()):
                lines.append(f"  {c:<28} {want_u:>22} {got_u:>22} {got_u - want_u}")
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
    credits: bool = True,
    stripe: bool = True,
    seed: int | None = None,
    timeout: float = 180.0,
    echo: Callable[[str], None] | None = None,
    busy: int = 15_000,
    restart: bool = True,
) -> VerifyReport:
    """Run a bounded chaos session on its own embedded stack and return the figures.

    Always starts its OWN Tansu broker (memory only) and topics under a fresh prefix. ClickHouse is
    ``settings.clickhouse_dsn`` if set (e.g. a test's database in the process's one chDB engine),
    else a new chDB path under a temporary directory (removed afterwards). Steps: publish prices,
    start the sinks (with :class:`FlakyClickHouse`) and one worker (pricing + credit agents);
    ``credits``: send each customer's :class:`CreditPlan` (grant + policy) and wait until the ledger
    holds the grants; produce ``events`` in ``kills + 1`` chunks with ``duplicates`` resends and the
    hostile records spread over them; SIGKILL + restart the worker after each of the first ``kills``
    chunks while it is working; take ClickHouse down for ``outages`` periods; wait until the stores
    settle and check the invariant (pricing, then the ledger and the final statuses); ``stripe``:
    run the real sync into a LocalStripe with faults and a crash mid-push, re-run, compare.

    Oversized input (issue #19.1): ``busy`` more events of ONE customer in the same burst, and one
    raw record of max-label events just under 1 MB. Restart of everything (``restart``, issue
    #19.2): after the checks pass, the broker and the worker are SIGKILLed, a NEW empty broker is
    started, ``pipeline.restore`` rebuilds the state from ClickHouse, every event is re-sent (the
    gateways' retry), and the checks run again; the balances must equal those before the restart.
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
        run_settings = settings.model_copy(
            update={
                "kafka_bootstrap": broker.bootstrap,
                "broker_flavor": "tansu",
                "topic_prefix": prefix,
                "data_dir": tmp,
                "clickhouse_dsn": dsn,
            }
        )
        ensure_topics(broker.bootstrap, prefix, run_settings.partitions)
        client = connect(dsn)
        apply_migrations(client)
        from pipeline.restore import restore_if_lost

        restore_if_lost(broker.bootstrap, run_settings.topic, client, partitions=run_settings.partitions)  # its epoch
        stack = ChaosStack(run_settings, client, tmp / "logs")
        expected = Expected()
        say(f"seed {seed}: broker {broker.bootstrap}, ClickHouse {dsn}")
        stack.publish_prices()
        stack.start_sink()
        if credits:
            stack.start_ledger_sink()
        worker = stack.start_worker()

        all_events = make_events(rng, events)
        if busy:
            one = all_events[0].customer_id if all_events else "acme"
            all_events += [e.model_copy(update={"customer_id": one}) for e in make_events(rng, busy, prefix="busy-")]
            report.busy_events = busy
        big = _max_label_record(rng, all_events[0].customer_id if all_events else "acme") if busy else None
        now_ms = time.time_ns() // 1_000_000
        if credits:
            whole = Expected()
            whole.add_priced(all_events + (big[1] if big else []))
            plans = plan_credits(rng, {c: t[2] for c, t in whole.per_customer().items()})
            expected.credit_plans = {p.customer_id: p for p in plans}
            n_grants = stack.send_commands(m for p in plans for m in p.commands(now_ms - 86_400_000))
            say(f"credits: {n_grants} policy/grant commands sent; waiting for the ledger to hold the grants")
            if not stack.wait_ledger(0, sum(1 for p in plans if p.grant), timeout=90, quiet=0.2):
                raise RuntimeError("the credit agent did not apply the grants in time")
        bad = hostile_records(rng, now_ms) if hostile else []
        chunks = [all_events[i :: kills + 1] for i in range(kills + 1)]
        bad_chunks = [bad[i :: kills + 1] for i in range(kills + 1)]
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
        if big is not None:
            stack.produce_raw([big[0]])
            expected.add_priced(big[1])
            report.big_record_bytes = len(big[0][1])
        stack.price_mirror_start()
        report.outages_injected = stack.ch.outages
        report.distinct_events = len(expected.priced)
        say("waiting for the stores to settle")
        report.settled = stack.wait_settled(expected, timeout=timeout)
        checks: list[InvariantCheck] = list(PRICING_CHECKS)
        if credits:
            n_grants = sum(1 for p in expected.credit_plans.values() if p.grant)
            report.settled = stack.wait_ledger(len(expected.priced), n_grants, timeout=timeout) and report.settled
            statuses = stack.settled_statuses(expected)
            checks += credit_checks(statuses)
        report.kills_survived = stack.kills if report.settled else 0
        report.deltas = check_invariants(stack.query, expected, checks)
        report.priced_rows, report.rejected_rows = stack.counts()
        observed = {
            str(c): Decimal(ch)
            for c, ch in stack.query("SELECT customer_id, sum(charge) FROM usage_priced GROUP BY customer_id")
        }
        want = expected.per_customer()
        for c in sorted(set(observed) | set(want)):
            report.per_customer[c] = (want.get(c, (0, Decimal(0), Decimal(0)))[2], observed.get(c, Decimal(0)))
        if credits:
            entries = _entries_by_customer(stack.query)
            for c, plan in expected.credit_plans.items():
                charge = want.get(c, (0, Decimal(0), Decimal(0)))[2]
                got = entries.get(c, (Decimal(0), Decimal(0)))
                out, st = plan.outcome(charge), statuses.get(c) or {}
                report.ledger[c] = (
                    plan.effective_policy,
                    charge,
                    got[0] + got[1],
                    f"{out.status}" + (f" ({out.reason})" if out.reason else ""),
                    f"{st.get('status')}" + (f" ({st['reason']})" if st.get("reason") else ""),
                )
        if restart and credits and report.settled and not report.deltas:
            stack, broker = _restart_everything(
                stack,
                broker,
                expected,
                report,
                events=all_events + (big[1] if big else []),
                checks_of=credit_checks,
                timeout=timeout,
                say=say,
            )
        if stripe:
            say("Stripe: provision, sync with injected faults and a crash mid-push, re-run")
            session = StripeSession(stack.ch())
            try:
                report.stripe = session.run(expected, rng, say=say)
            finally:
                session.close()
            report.deltas += report.stripe.deltas
        return report
    finally:
        if stack is not None:
            stack.close()
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _max_label_record(rng: random.Random, customer: str) -> tuple[tuple[bytes, bytes], list[Any]]:
    """One raw usage record just under 1 MB: events with 64 labels of 256-character keys and values."""
    from schemas.codec import encode_usage_batch, event_to_record
    from schemas.models import MAX_ID_LEN, MAX_LABEL_LEN, MAX_LABELS

    events = [
        e.model_copy(
            update={
                "customer_id": customer,
                "event_id": f"big-{uuid.UUID(int=rng.getrandbits(128))}".ljust(MAX_ID_LEN, "x"),
                "labels": {
                    f"{i}-{k}-".ljust(MAX_LABEL_LEN, "k"): str(k).ljust(MAX_LABEL_LEN, "v") for k in range(MAX_LABELS)
                },
            }
        )
        for i, e in enumerate(make_events(rng, 40))
    ]
    while len(encode_usage_batch([event_to_record(e) for e in events])) > 990_000:
        events.pop()
    return (customer.encode(), encode_usage_batch([event_to_record(e) for e in events])), events


def _restart_everything(
    stack: ChaosStack,
    broker: Any,
    expected: Expected,
    report: VerifyReport,
    *,
    events: list[Any],
    checks_of: Callable[..., Any],
    timeout: float,
    say: Callable[[str], None],
) -> tuple[ChaosStack, Any]:
    """SIGKILL the broker and the worker, start a new empty broker, restore from ClickHouse, re-send
    every event, check again (the caller's ``report`` gets the new deltas)."""
    import os
    import signal

    from meterline.stack.broker import TansuBroker
    from meterline.stack.topics import ensure_topics
    from pipeline.restore import restore_if_lost

    before = _balances(stack)
    until = time.monotonic() + 30
    while (stack.price_mirror is None or not stack.price_mirror.mirrored) and time.monotonic() < until:
        time.sleep(0.2)
    say(f"restart of everything: SIGKILL the broker (pid {broker.pid}) and the worker")
    if broker.pid is not None:
        os.killpg(broker.pid, signal.SIGKILL)
    for w in stack.workers:
        stack.kill_worker(w)
    client = stack.ch.client
    stack.close()
    broker.stop()
    broker = TansuBroker(log_dir=stack.log_dir.parent).start()
    settings = stack.settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
    ensure_topics(broker.bootstrap, settings.topic_prefix, settings.partitions)
    restored = restore_if_lost(
        broker.bootstrap,
        settings.topic,
        client,
        say,
        partitions=settings.partitions,
        dedupe_window_days=settings.dedupe_window_days,
    )
    say(restored.line())
    report.restarts += 1
    report.restored_ledgers = len(restored.customers)
    stack = ChaosStack(settings, client, stack.log_dir)
    stack.start_sink()
    stack.start_ledger_sink()
    stack.start_worker()
    stack.price_mirror_start()
    want = set(expected.credit_plans)
    deadline = time.monotonic() + timeout
    while not want <= set(stack.latest("customer-status")) and time.monotonic() < deadline:
        time.sleep(0.5)
    report.balances_kept = _balances(stack) == before
    if not report.balances_kept:
        report.deltas.append(Delta("restart", "balances", str(before), str(_balances(stack))))
    say("restart of everything: re-sending every event (the gateways' retry)")
    stack.produce(events)
    settled = stack.wait_settled(expected, timeout=timeout)
    n_grants = sum(1 for p in expected.credit_plans.values() if p.grant)
    settled = stack.wait_ledger(len(expected.priced), n_grants, timeout=timeout) and settled
    statuses = stack.settled_statuses(expected)
    report.settled = report.settled and settled
    report.deltas += check_invariants(stack.query, expected, list(PRICING_CHECKS) + list(checks_of(statuses)))
    return stack, broker


def _balances(stack: ChaosStack) -> dict[str, tuple[str, str]]:
    """credit_remaining and overage per customer, from the latest customer-status records."""
    return {
        c: (str((v.get("balance") or {}).get("credit_remaining")), str((v.get("balance") or {}).get("overage")))
        for c, v in stack.latest("customer-status").items()
    }


def verify_command(
    events: int = 3000,
    kills: int = 2,
    duplicates: int = 300,
    outages: int = 1,
    credits: bool = True,
    stripe: bool = True,
    seed: int | None = None,
    busy: int = 15_000,
    restart: bool = True,
) -> None:
    """Chaos-check this build: kill workers, replay, inject bad input, a ClickHouse outage and Stripe
    faults; every Δ must be 0 (pricing, ledger ``--credits``, Stripe push ``--stripe``). ``--busy N``:
    N events of one customer in one burst plus a ~1 MB record of max-label events (0: off);
    ``--restart``: SIGKILL everything (broker included), restore from ClickHouse, re-send, re-check.

    Mount with ``app.command("verify")(verify_command)``; typer reads the parameters as options.
    """
    import typer

    settings = Settings().model_copy(update={"clickhouse_dsn": None})  # never write into a configured ClickHouse
    report = run_verify(
        settings,
        events=events,
        kills=kills,
        duplicates=duplicates,
        outages=outages,
        credits=credits,
        stripe=stripe,
        seed=seed,
        busy=busy,
        restart=restart,
        echo=lambda s: typer.echo(f"  · {s}"),
    )
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(1)
