"""Re-rating (jobs/reprice) on the real ClickHouse engine (chDB): exactness against the Python
pricing engine event by event, corrections reaching the rollups, the ledger (through the real
ledger-commands codec and the pure ledger the credit agent runs) and the Stripe sync, idempotence,
and a crash at every step of an apply followed by a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.stripe_local import LocalStripe
from jobs.reprice.apply import apply_plan, correction_id
from jobs.reprice.compute import Filters, open_reprice, plan_reprice
from jobs.stripe import BillingConfig, StripeTarget, provision, sync
from jobs.stripe._store import load_pushes
from jobs.stripe.reconcile import reconcile
from meterline.core.ledger import CreditGrant, Grant, Policy, apply, new_ledger
from meterline.core.ledger._types import ApplyPricedUsage
from meterline.core.money import to_decimal
from pipeline.sink import rebuild_rollups
from schemas.credits import decode_command
from tests.jobs.conftest import DAY, HOUR
from tests.jobs.reprice_helpers import (
    BOOK_AFTER,
    BOOK_BEFORE,
    CUSTOMERS,
    PERIOD,
    T0,
    engine,
    expected_totals,
    insert_priced,
    make_events,
)

FILTERS = Filters(T0, T0 + 31 * 86400)
AT_MS = (T0 + 40 * 86400) * 1000


def _sums(ch: Any, sql: str) -> dict[str, tuple[Decimal, Decimal]]:
    return {str(c): (Decimal(a), Decimal(b)) for c, a, b in ch.query(sql).result_rows}


def _rollups(ch: Any) -> tuple[dict[str, tuple[Decimal, Decimal]], ...]:
    return tuple(
        _sums(ch, f"SELECT customer_id, sum(cost), sum(charge) FROM {t} GROUP BY customer_id")
        for t in ("usage_hourly", "usage_daily")
    )


def test_clickhouse_rerating_equals_the_python_engine_event_by_event(clickhouse: Any) -> None:
    events = make_events(7, 3000)
    insert_priced(clickhouse, events, engine(BOOK_BEFORE))
    plan = plan_reprice(clickhouse, engine(BOOK_AFTER), FILTERS)
    new, old = expected_totals(events, engine(BOOK_AFTER)), expected_totals(events, engine(BOOK_BEFORE))
    got = {c["customer_id"]: c for c in plan.customers()}
    assert set(got) == set(new)
    for cust, (cost, charge) in new.items():
        assert (got[cust]["new_cost"], got[cust]["new_charge"]) == (cost, charge)
        assert (got[cust]["old_cost"], got[cust]["old_charge"]) == old[cust]
        assert got[cust]["delta"] == charge - old[cust][1]
    # per model and new version: the same split the engine makes
    per: dict[tuple[str, str, str], int] = {}
    eng = engine(BOOK_AFTER)
    for ev in events:
        p = eng.price(ev)
        k = (ev["customer_id"], ev["model"], p.price_version)
        per[k] = per.get(k, 0) + p.charge_picos
    assert {(ln.customer_id, ln.model, ln.new_version): ln.new_charge for ln in plan.lines} == {
        k: to_decimal(v) for k, v in per.items()
    }
    # the gpt-4o correction splits at the new version's first millisecond
    assert {ln.new_version.split("@")[1][:10] for ln in plan.lines if ln.model == "gpt-4o"} == {
        "2025-11-01",
        "2025-12-10",
    }
    # the correction rows ClickHouse writes sum to the customer deltas, exactly
    with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
        rp.insert_corrections("t", datetime.now(UTC))
    by = _sums(clickhouse, "SELECT customer_id, sum(cost), sum(charge) FROM usage_corrections GROUP BY customer_id")
    assert by == {c: (got[c]["cost_delta"], got[c]["delta"]) for c in got}


def _ledger_run(ch: Any, events: list[dict[str, Any]], eng: Any, grants: dict[str, int]) -> dict[str, Any]:
    """The credit agent's pure ledger over the original usage; its entries stored like the ledger sink does."""
    states = {c: new_ledger(c, "usd", Policy(overage="allow")) for c in CUSTOMERS}
    rows = []
    for cust, amount in grants.items():
        s, eff = apply(
            states[cust],
            Grant(
                grant=CreditGrant(
                    grant_id=f"g-{cust}",
                    customer_id=cust,
                    amount_picos=amount,
                    currency="usd",
                    effective_at_ms=(T0 - 86400) * 1000,
                ),
                at_ms=(T0 - 86400) * 1000,
            ),
        )
        states[cust] = s
        rows += eff.entries
    for ev in sorted(events, key=lambda e: e["occurred_at"]):
        p = eng.price(ev)
        s, eff = apply(
            states[ev["customer_id"]],
            ApplyPricedUsage(
                event_id=ev["event_id"],
                occurred_at_ms=ev["occurred_at"],
                charge_picos=p.charge_picos,
                currency="usd",
                provider=ev["provider"],
                model=ev["model"],
                project=ev["project"],
            ),
        )
        states[ev["customer_id"]] = s
        rows += eff.entries
    ch.insert(
        "ledger_entries",
        [
            [
                e.entry_id,
                datetime.fromtimestamp(e.at_ms // 1000, UTC),
                e.customer_id,
                e.seq,
                e.kind,
                to_decimal(e.amount_picos),
                e.currency,
                e.grant_id or "",
                e.event_id or "",
                e.reason or "",
            ]
            for e in rows
        ],
        column_names=[
            "entry_id",
            "at",
            "customer_id",
            "seq",
            "kind",
            "amount",
            "currency",
            "grant_id",
            "event_id",
            "reason",
        ],
    )
    return states


def _credit_used(state: Any, granted: int) -> int:
    """What the customer was charged per the ledger's balances: credit granted (before any
    correction: a refund to credit raises the remaining) − remaining + overage."""
    return granted - sum(g.remaining for g in state.grants.values()) + state.overage_picos


@pytest.mark.parametrize("direction", ["retroactive_correction_down", "price_raised_after_the_fact"])
def test_apply_reaches_rollups_and_ledger_and_a_second_apply_is_a_noop(clickhouse: Any, direction: str) -> None:
    before, after = (BOOK_BEFORE, BOOK_AFTER) if direction.endswith("down") else (BOOK_AFTER, BOOK_BEFORE)
    events = make_events(11, 1500)
    insert_priced(clickhouse, events, engine(before))
    old = expected_totals(events, engine(before))
    # acme's grant covers everything, globex's half of it, initech has none (all overage)
    grants = {"acme": 10**15, "globex": int(old["globex"][1].scaleb(12)) // 2}
    states = _ledger_run(clickhouse, events, engine(before), grants)

    sent: list[dict[str, Any]] = []
    with open_reprice(clickhouse, engine(after), FILTERS) as rp:
        plan = rp.report()
        n, _ = rp.delta_summary()
        res = apply_plan(
            clickhouse, rp, ran_by="test", reason="provider price fix", command="test", send=sent.append, at_ms=AT_MS
        )
    assert res.correction_id and res.rows == n > 0 and res.commands == len(sent) > 0
    assert {c["customer_id"]: c["delta"] for c in plan.customers()} == {
        c: new_[1] - old[c][1] for c, new_ in expected_totals(events, engine(after)).items()
    }

    new = expected_totals(events, engine(after))
    # ClickHouse: usage_priced + usage_corrections and both rollups equal the re-rated figures, exactly
    combined = _sums(
        clickhouse,
        "SELECT customer_id, sum(cost), sum(charge) FROM (SELECT customer_id, cost, charge "
        "FROM usage_priced UNION ALL SELECT customer_id, cost, charge FROM usage_corrections) "
        "GROUP BY customer_id",
    )
    assert combined == new
    hourly, daily = _rollups(clickhouse)
    assert hourly == new and daily == new
    assert clickhouse.query("SELECT sum(events) FROM usage_hourly").result_rows[0][0] == len(events)

    # Ledger: the commands through the real codec into the pure ledger the credit agent runs
    for cmd in sent:
        req = decode_command(json.dumps(cmd).encode())
        assert req.command is not None
        s, eff = apply(
            states[req.customer_id] if req.customer_id in states else new_ledger(req.customer_id, "usd"), req.command
        )
        assert eff.skipped is None
        states[req.customer_id] = s
    for cust, (_, charge) in new.items():
        assert to_decimal(_credit_used(states[cust], grants.get(cust, 0))) == charge, cust
    # applying the same commands again (a re-send) changes nothing
    for cmd in sent:
        req = decode_command(json.dumps(cmd).encode())
        s, eff = apply(states[req.customer_id], req.command)  # type: ignore[arg-type]
        assert eff.skipped == "duplicate"

    # audit
    run = clickhouse.query(
        "SELECT ran_by, reason, status, versions_before != versions_after, delta FROM reprice_runs FINAL"
    ).result_rows
    assert run == [("test", "provider price fix", "done", 1, sum((new[c][1] - old[c][1] for c in new), Decimal(0)))]

    # a second apply: nothing left to correct, nothing written, nothing sent
    again: list[dict[str, Any]] = []
    with open_reprice(clickhouse, engine(after), FILTERS) as rp:
        plan2 = rp.report()
        assert rp.delta_summary() == (0, 0) and all(c["delta"] == 0 for c in plan2.customers())
        res2 = apply_plan(clickhouse, rp, ran_by="test", reason="again", command="test", send=again.append, at_ms=AT_MS)
    assert res2.noop and again == []
    assert _rollups(clickhouse) == (new, new)
    assert clickhouse.query("SELECT count() FROM reprice_runs FINAL").result_rows[0][0] == 1
    # a rollup repair (pipeline/sink.py) keeps the corrections
    rebuild_rollups(clickhouse)
    assert _rollups(clickhouse) == (new, new)


class Crash(Exception):
    pass


def test_a_crash_at_every_step_then_a_resume_is_exact(clickhouse: Any) -> None:
    events = make_events(13, 600)
    insert_priced(clickhouse, events, engine(BOOK_BEFORE))
    new = expected_totals(events, engine(BOOK_AFTER))
    step = 0
    crashes = 0
    sent: list[dict[str, Any]] = []
    while True:  # crash after step 1, then after step 2 of the resumed run, ... until a run completes
        step += 1

        def on_step(name: str, seen: list[int] = [0], at: int = step) -> None:  # noqa: B006 - one list per run
            seen[0] += 1
            if seen[0] == at:
                raise Crash(name)

        try:
            with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
                rp.report()
                apply_plan(
                    clickhouse,
                    rp,
                    ran_by="test",
                    reason="crash",
                    command="test",
                    send=sent.append,
                    at_ms=AT_MS,
                    on_step=on_step,
                )
            break
        except Crash:
            crashes += 1
    assert crashes >= 3
    # one final resume finds nothing to do
    with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
        final = apply_plan(clickhouse, rp, ran_by="test", reason="crash", command="test", send=sent.append, at_ms=AT_MS)
    assert final.noop
    assert _rollups(clickhouse) == (new, new)
    assert clickhouse.query("SELECT uniqExact(correction_id), count() FROM usage_corrections").result_rows[0][0] == 1
    assert clickhouse.query("SELECT status FROM reprice_runs FINAL").result_rows == [("done",)]
    # commands may have been re-sent after a crash, but always with the same ids and content
    by_id: dict[str, str] = {}
    for cmd in sent:
        assert by_id.setdefault(cmd["command_id"], json.dumps(cmd, sort_keys=True)) == json.dumps(cmd, sort_keys=True)


def test_correction_id_is_deterministic(clickhouse: Any) -> None:
    insert_priced(clickhouse, make_events(3, 200), engine(BOOK_BEFORE))
    ids = []
    for _ in range(2):
        with open_reprice(clickhouse, engine(BOOK_AFTER), FILTERS) as rp:
            ids.append(correction_id(FILTERS, *rp.delta_summary()))
    assert ids[0] == ids[1]
    with open_reprice(clickhouse, engine(BOOK_AFTER), Filters(FILTERS.start, FILTERS.end, "acme")) as rp:
        assert correction_id(rp.plan.filters, *rp.delta_summary()) != ids[0]


_SEED_SCRIPT = """
import sys
from meterline.stack.clickhouse import apply_migrations, connect
from tests.jobs.reprice_helpers import BOOK_BEFORE, engine, insert_priced, make_events
ch = connect(sys.argv[1])
apply_migrations(ch)
insert_priced(ch, make_events(5, 400), engine(BOOK_BEFORE))
ch.close()
"""


def test_cli_dry_run_json_is_exact_and_writes_nothing(tmp_path: Path) -> None:
    """The installed command as a subprocess, on its own embedded engine (seeded by another process:
    one process at a time may open an embedded engine, and this test's process holds the session's)."""
    dsn = f"chdb://{tmp_path / 'engine'}?database=rp"
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "METERLINE_CLICKHOUSE_DSN": dsn,
        "METERLINE_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(root),
    }
    seeded = subprocess.run(
        [sys.executable, "-c", _SEED_SCRIPT, dsn], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert seeded.returncode == 0, seeded.stderr
    events = make_events(5, 400)
    prices = tmp_path / "after.yaml"
    prices.write_text(yaml.safe_dump(BOOK_AFTER))
    exe = Path(sys.executable).with_name("meterline")
    out = subprocess.run(
        [
            str(exe),
            "reprice",
            "--period",
            PERIOD,
            "--dry-run",
            "--prices",
            str(prices),
            "--format",
            "json",
            "--customer",
            "globex",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    new, old = expected_totals(events, engine(BOOK_AFTER)), expected_totals(events, engine(BOOK_BEFORE))
    assert [c["customer_id"] for c in doc["customers"]] == ["globex"]
    c = doc["customers"][0]
    assert (Decimal(c["old_charge"]), Decimal(c["new_charge"])) == (old["globex"][1], new["globex"][1])
    assert Decimal(c["delta"]) == new["globex"][1] - old["globex"][1] != 0
    assert isinstance(c["delta"], str) and all("globex#" in m["new_rate_card"] for m in c["models"])
    table = subprocess.run(
        [str(exe), "reprice", "--period", PERIOD, "--dry-run", "--prices", str(prices), "--model", "openai/gpt-4o"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert table.returncode == 0, table.stderr
    assert "openai/gpt-4o" in table.stdout and "anthropic" not in table.stdout
    assert "\x1b[" not in table.stderr + table.stdout  # no progress bar or colour off a terminal
    # a dry run wrote nothing
    check = subprocess.run(
        [str(exe), "sql", "SELECT count() FROM usage_corrections", "--format", "csv"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().splitlines()[-1] == "0"


def test_stripe_gets_the_corrected_windows_and_reconcile_is_clean(
    ls: LocalStripe, target: StripeTarget, clickhouse: Any, cfg: BillingConfig
) -> None:
    """A surcharge agreed after the fact (acme +20 % -> +35 %) and a cache-write rate found too low:
    the next sync pushes each grown hour as a new revision. Then a discount agreed after the fact:
    the sync cancels the shrunk windows' events and re-pushes them. Each time Stripe's summaries
    equal the re-rated charge (to the µ$ carry) and reconcile shows no drift."""
    client = target.client()
    provision(client, clickhouse, cfg, customers=list(CUSTOMERS))
    base = ls.now() // HOUR * HOUR - 6 * HOUR
    events = make_events(17, 400, t0=base, seconds=5 * HOUR)
    raised = {
        **BOOK_BEFORE,
        "prices": [
            BOOK_BEFORE["prices"][0],
            {
                **BOOK_BEFORE["prices"][1],
                "per_million": {**BOOK_BEFORE["prices"][1]["per_million"], "cache_write": "4.00"},
            },
        ],
        "rate_cards": [{"customer_id": "*", "markup_pct": "0"}, {"customer_id": "acme", "markup_pct": "35"}],
    }
    insert_priced(clickhouse, events, engine(BOOK_BEFORE))
    assert sync(target, clickhouse, cfg, now=ls.now()).ok
    filters = Filters(base, base + 6 * HOUR)
    with open_reprice(clickhouse, engine(raised), filters) as rp:
        rp.report()
        res = apply_plan(
            clickhouse,
            rp,
            ran_by="test",
            reason="surcharge",
            command="test",
            send=lambda c: None,
            at_ms=ls.now() * 1000,
        )
    assert res.rows > 0
    summary = sync(target, clickhouse, cfg, now=ls.now())
    assert summary.ok and summary.planned > 0
    assert all(p.revision <= 1 for p in load_pushes(clickhouse))
    new = expected_totals(events, engine(raised))
    rows = reconcile(client, clickhouse, cfg, base - DAY, base + DAY)
    assert rows and not any(r.drifted for r in rows)
    for r in rows:
        assert r.clickhouse == new[r.customer_id][1] * 10**6  # ClickHouse's view includes the corrections
        assert r.stripe == r.pushed and 0 <= r.clickhouse - r.pushed < 1
    # a second sync sends nothing
    again = sync(target, clickhouse, cfg, now=ls.now())
    assert again.ok and again.planned == 0 and again.sent == 0

    # then a discount agreed after the fact (globex -15 %) and acme back to +20 %: windows shrink.
    # Within Stripe's 24 h the sync cancels the windows' meter events and re-pushes the rest.
    discounted = {
        **BOOK_BEFORE,
        "rate_cards": [*BOOK_BEFORE["rate_cards"], {"customer_id": "globex", "discount_pct": "15"}],
    }
    with open_reprice(clickhouse, engine(discounted), filters) as rp:
        rp.report()
        assert (
            apply_plan(
                clickhouse,
                rp,
                ran_by="test",
                reason="discount",
                command="test",
                send=lambda c: None,
                at_ms=ls.now() * 1000,
            ).rows
            > 0
        )
    cut = sync(target, clickhouse, cfg, now=ls.now())
    assert cut.ok and cut.cancels > 0 and cut.canceled == cut.cancels and not cut.shrunk, cut
    new = expected_totals(events, engine(discounted))
    rows = reconcile(client, clickhouse, cfg, base - DAY, base + DAY)
    assert rows and not any(r.drifted for r in rows)
    for r in rows:
        assert r.clickhouse == new[r.customer_id][1] * 10**6
        assert r.stripe == r.pushed and 0 <= r.clickhouse - r.pushed < 1
    final = sync(target, clickhouse, cfg, now=ls.now())
    assert final.ok and final.planned == 0 and final.sent == 0 and final.cancels == 0


@pytest.mark.parametrize("kill_at", [2, 4])
def test_sigkill_mid_apply_then_resume_is_exact(tmp_path: Path, kill_at: int) -> None:
    """A real SIGKILL of the applying process (after the insert; in the middle of the ledger sends),
    then a new run: the rollups equal the re-rated totals and every command id carries one content."""
    dsn = f"chdb://{tmp_path / 'engine'}?database=rk"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = tmp_path / "commands.jsonl"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tests.jobs.reprice_kill_driver", *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert run("seed", dsn).returncode == 0
    killed = run("apply", dsn, str(out), str(kill_at))
    assert killed.returncode == -9, killed.stderr
    resumed = run("apply", dsn, str(out), "0")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(run("apply", dsn, str(out), "0").stdout)["noop"]  # then nothing is left to do
    done = json.loads(run("totals", dsn).stdout)
    new = expected_totals(make_events(41, 800), engine(BOOK_AFTER))
    assert {c: Decimal(v) for c, v in done["hourly"].items()} == {c: v[1] for c, v in new.items()}
    statuses = [r[1] for r in done["runs"]]
    assert "done" in statuses and set(statuses) <= {"done", "abandoned"}
    by_id: dict[str, str] = {}
    for line in out.read_text().splitlines():
        assert by_id.setdefault(json.loads(line)["command_id"], line) == line
    assert by_id  # the ledger got its commands


def test_cli_apply_sends_ledger_commands_and_a_second_apply_is_a_noop(
    tmp_path: Path, kafka_bootstrap: str, topics: dict[str, str], topic_prefix: str
) -> None:
    """The installed command, applying: the catalog from the prices topic, the ledger commands on
    ledger-commands (read back), the audit row; run again: nothing to correct, nothing sent."""
    from meterline.core.pricing import load_price_book
    from meterline.stack.kafka import read_topic
    from pipeline.publish import publish_records

    dsn = f"chdb://{tmp_path / 'engine'}?database=rp"
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "METERLINE_CLICKHOUSE_DSN": dsn,
        "METERLINE_DATA_DIR": str(tmp_path / "data"),
        "METERLINE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "METERLINE_TOPIC_PREFIX": topic_prefix,
        "METERLINE_OPERATOR": "alice",
        "PYTHONPATH": str(root),
    }
    assert (
        subprocess.run(
            [sys.executable, "-c", _SEED_SCRIPT, dsn], env=env, cwd=root, capture_output=True, text=True, timeout=300
        ).returncode
        == 0
    )
    publish_records(kafka_bootstrap, f"{topic_prefix}prices", load_price_book(BOOK_AFTER).to_records())
    exe = str(Path(sys.executable).with_name("meterline"))
    first = subprocess.run(
        [exe, "reprice", "--period", PERIOD, "--reason", "provider fixed prices late", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    applied = doc["applied"]
    assert applied["correction_id"] and applied["correction_rows"] > 0 and applied["ledger_commands"] > 0
    events = make_events(5, 400)
    new, old = expected_totals(events, engine(BOOK_AFTER)), expected_totals(events, engine(BOOK_BEFORE))
    assert {c["customer_id"]: Decimal(c["delta"]) for c in doc["customers"]} == {c: new[c][1] - old[c][1] for c in new}
    commands = [
        json.loads(m.value()) for m in read_topic(kafka_bootstrap, f"{topic_prefix}ledger-commands", timeout=15)
    ]
    assert len(commands) == applied["ledger_commands"]
    assert {c["command_id"].split(":")[1] for c in commands} == {applied["correction_id"]}
    for cust in new:  # the commands move each customer by exactly its delta
        moved = sum(
            (
                Decimal(c["amount"]) * (1 if c["type"] == "usage_correction" else -1)
                for c in commands
                if c["customer_id"] == cust
            ),
            Decimal(0),
        )
        assert moved == new[cust][1] - old[cust][1]
    second = subprocess.run([exe, "reprice", "--period", PERIOD], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "nothing to correct" in second.stdout
    assert len(read_topic(kafka_bootstrap, f"{topic_prefix}ledger-commands", timeout=15)) == len(commands)
    audit = subprocess.run(
        [exe, "sql", "SELECT ran_by, reason, status FROM reprice_runs FINAL", "--format", "csv"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert audit.stdout.strip().splitlines()[-1] == "alice,provider fixed prices late,done"


def test_events_nothing_prices_now_keep_their_charge_never_zero(clickhouse: Any) -> None:
    """A model dropped from the catalog (and a class whose rate is gone): its events are reported
    unpriceable with the reason and keep what they were billed; no correction is written for them."""
    llama = {
        "provider": "meta",
        "model": "llama-3-70b",
        "effective_from": "2025-11-01T00:00:00Z",
        "per_million": {"input": "0.59", "output": "0.79"},
    }
    with_llama = {**BOOK_BEFORE, "prices": [*BOOK_BEFORE["prices"], llama]}
    events = make_events(19, 300)
    for ev in events[:60]:
        ev.update(provider="meta", model="llama-3-70b", model_version=None, cached_input_tokens=0, cache_write_tokens=0)
    insert_priced(clickhouse, events, engine(with_llama))
    # now: llama is gone and claude has no cache_write rate any more
    claude = {**BOOK_BEFORE["prices"][1], "per_million": {"input": "3.00", "output": "15.00", "cached_input": "0.30"}}
    now_book = {**BOOK_BEFORE, "prices": [BOOK_BEFORE["prices"][0], claude]}
    with open_reprice(clickhouse, engine(now_book), FILTERS) as rp:
        plan = rp.report()
        apply_plan(clickhouse, rp, ran_by="t", reason="t", command="t", send=lambda c: None, at_ms=AT_MS)
    lost = [ln for ln in plan.lines if ln.model == "llama-3-70b"]
    assert lost and all(ln.unpriceable_reason == "unknown_model" and ln.unpriceable == ln.events for ln in lost)
    assert all(ln.new_charge == ln.old_charge > 0 for ln in lost)
    no_rate = sum(1 for ev in events if ev["model"] == "claude-3-5-sonnet" and ev["cache_write_tokens"])
    assert no_rate and sum(ln.unpriceable for ln in plan.lines if ln.model == "claude-3-5-sonnet") == no_rate
    assert clickhouse.query("SELECT count() FROM usage_corrections WHERE model = 'llama-3-70b'").result_rows[0][0] == 0
    # everything is as billed: the catalog now prices the rest identically
    assert all(c["delta"] == 0 for c in plan.customers())


def test_v2_classes_tool_fees_and_service_tiers_are_rerated_exactly(clickhouse: Any) -> None:
    """Every count column of usage_priced is re-rated (audio tokens, web-search calls), and a
    service tier is its own timeline: the ClickHouse figures equal the engine's, event by event."""

    def book(audio: str, search: str, batch_input: str) -> dict[str, Any]:
        std = {
            "provider": "openai",
            "model": "gpt-4o",
            "effective_from": "2025-11-01T00:00:00Z",
            "per_million": {"input": "5.00", "output": "15.00", "input_audio": audio},
            "tool_fees": {"web_search": search},
        }
        batch = {
            **std,
            "service_tier": "batch",
            "per_million": {"input": batch_input, "output": "7.50", "input_audio": audio},
        }
        return {
            "currency": "USD",
            "prices": [std, batch],
            "rate_cards": [{"customer_id": "*", "markup_pct": "0"}, {"customer_id": "acme", "markup_pct": "10"}],
        }

    events = make_events(23, 500)
    for i, ev in enumerate(events):
        ev.update(
            provider="openai",
            model="gpt-4o",
            model_version=None,
            cached_input_tokens=0,
            cache_write_tokens=0,
            input_audio_tokens=(i * 37) % 5000,
            web_search_requests=i % 3,
            service_tier="batch" if i % 4 == 0 else None,
        )
    before, after = engine(book("40.00", "0.01", "2.50")), engine(book("32.00", "0.025", "2.00"))
    insert_priced(clickhouse, events, before)
    plan = plan_reprice(clickhouse, after, FILTERS)
    want = expected_totals(events, after)
    got = {c["customer_id"]: (c["new_cost"], c["new_charge"]) for c in plan.customers()}
    assert got == want
    assert {ln.new_version.split("@")[0] for ln in plan.lines} == {"openai/gpt-4o", "openai/gpt-4o~batch"}
