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
from typing import Any, Optional

from meterline.config import Settings
from meterline.verify.oracle import check_invariants, Delta, Expected, InvariantCheck, PRICING_CHECKS
from meterline.verify.credits import credit_checks, plan_credits, _entries_by_customer
from meterline.verify.stripe_sync import StripeReport, StripeSession
from meterline.verify.inputs import hostile_records, make_events
from meterline.verify.stack import ChaosStack, FlakyClickHouse

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
        if credits:
            stack.start_ledger_sink()
        worker = stack.start_worker()

        all_events = make_events(rng, events)
        now_ms = time.time_ns() // 1_000_000
        if credits:
            whole = Expected()
            whole.add_priced(all_events)
            plans = plan_credits(rng, {c: t[2] for c, t in whole.per_customer().items()})
            expected.credit_plans = {p.customer_id: p for p in plans}
            n_grants = stack.send_commands(m for p in plans for m in p.commands(now_ms - 86_400_000))
            say(f"credits: {n_grants} policy/grant commands sent; waiting for the ledger to hold the grants")
            if not stack.wait_ledger(0, sum(1 for p in plans if p.grant), timeout=90, quiet=0.2):
                raise RuntimeError("the credit agent did not apply the grants in time")
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
        checks: list[InvariantCheck] = list(PRICING_CHECKS)
        if credits:
            n_grants = sum(1 for p in expected.credit_plans.values() if p.grant)
            report.settled = stack.wait_ledger(len(expected.priced), n_grants, timeout=timeout) and report.settled
            statuses = stack.settled_statuses(expected)
            checks += credit_checks(statuses)
        report.kills_survived = stack.kills if report.settled else 0
        report.deltas = check_invariants(stack.query, expected, checks)
        report.priced_rows, report.rejected_rows = stack.counts()
        observed = {str(c): Decimal(ch) for c, ch in stack.query(
            "SELECT customer_id, sum(charge) FROM usage_priced GROUP BY customer_id")}  # fmt: skip
        want = expected.per_customer()
        for c in sorted(set(observed) | set(want)):
            report.per_customer[c] = (want.get(c, (0, Decimal(0), Decimal(0)))[2], observed.get(c, Decimal(0)))
        if credits:
            entries = _entries_by_customer(stack.query)
            for c, plan in expected.credit_plans.items():
                charge = want.get(c, (0, Decimal(0), Decimal(0)))[2]
                got = entries.get(c, (Decimal(0), Decimal(0)))
                out, st = plan.outcome(charge), statuses.get(c) or {}
                report.ledger[c] = (plan.effective_policy, charge, got[0] + got[1],
                                    f"{out.status}" + (f" ({out.reason})" if out.reason else ""),
                                    f"{st.get('status')}" + (f" ({st['reason']})" if st.get("reason") else ""))  # fmt: skip
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
            except Exception:  # noqa: BLE001 - closing on the way out
                pass
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def verify_command(
    events: int = 3000,
    kills: int = 2,
    duplicates: int = 300,
    outages: int = 1,
    credits: bool = True,
    stripe: bool = True,
    seed: Optional[int] = None,  # noqa: UP007 - typer reads the annotation at runtime
) -> None:
    """Chaos-check this build: kill workers, replay, inject bad input, a ClickHouse outage and Stripe
    faults; every Δ must be 0 (pricing, ledger ``--credits``, Stripe push ``--stripe``).

    Mount with ``app.command("verify")(verify_command)``; typer reads the parameters as options.
    """
    import typer

    settings = Settings().model_copy(update={"clickhouse_dsn": None})  # never write into a configured ClickHouse
    report = run_verify(settings, events=events, kills=kills, duplicates=duplicates, outages=outages, credits=credits,
                        stripe=stripe, seed=seed, echo=lambda s: typer.echo(f"  · {s}"))  # fmt: skip
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(1)
