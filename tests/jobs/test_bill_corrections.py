"""Bills after a re-rating (``meterline reprice``): ``bill preview`` / ``bill close`` and the
statement include the corrections as lines of their own, exactly (docs/corrections.md, docs/plans.md).

The data is that of tests/jobs/test_reprice_plans.py: acme pays per token until 2025-12-05T12:30:00Z
and is then on an amount allowance + rate-card overage plan; globex is on included tokens +
per-million overage all month; initech pays per token. The expected bills are computed by hand from
the plan definitions and the events priced one by one by the Python pricing engine
(``expected``), never by the code under test. The re-rating is a real ``reprice`` apply on chDB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from jobs.plans.billing import bill_preview, close_period
from jobs.reprice.apply import apply_plan
from jobs.reprice.compute import open_reprice
from jobs.stripe.statement import build_statement, render_csv, render_html
from tests.jobs.reprice_helpers import BOOK_AFTER, BOOK_BEFORE, T0, engine, make_events
from tests.jobs.test_reprice_plans import AT_MS, FILTERS, expected, setup_plan_usage

MONTH = "2025-12"
DEC, JAN = T0, T0 + 31 * 86400


def _cents(d: Decimal) -> str:
    return str(d.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def _reprice(ch: Any, book: dict[str, Any], reason: str, at_ms: int = AT_MS) -> str:
    sent: list[dict[str, Any]] = []
    with open_reprice(ch, engine(book), FILTERS) as rp:
        rp.report()
        res = apply_plan(ch, rp, ran_by="test", reason=reason, command="test", send=sent.append, at_ms=at_ms)
    assert res.correction_id and not res.noop
    return res.correction_id


def _check_acme(doc: dict[str, Any], old: dict[str, Any], new: dict[str, Any], cid: str, reason: str) -> None:
    """acme's December bill after the re-rating: the re-rated figures, with the correction lines."""
    a_old, a_new = old["acme"], new["acme"]
    assert Decimal(doc["subtotal"]) == a_new["payg"] + a_new["bill"]
    assert doc["total"] == _cents(a_new["payg"] + a_new["bill"])
    corr = [ln for ln in doc["lines"] if ln["kind"] == "correction"]
    assert [(ln["ref"], Decimal(ln["amount"])) for ln in corr] == [
        (cid, a_new["payg"] - a_old["payg"]),  # the pay-per-token days before the plan
        (cid, a_new["bill"] - a_old["bill"]),  # the plan period's bill
    ]
    assert all(f"correction {cid} ({reason})" in ln["description"] for ln in corr)
    # the usage line stays as priced at the time; the lines add up to the subtotal
    [usage] = [ln for ln in doc["lines"] if ln["kind"] == "usage"]
    assert Decimal(usage["amount"]) == a_old["payg"]
    assert sum(Decimal(ln["amount"]) for ln in doc["lines"]) == Decimal(doc["subtotal"])
    [period] = doc["periods"]
    assert Decimal(period["subtotal"]) == a_new["bill"] and Decimal(period["billed_subtotal"]) == a_old["bill"]
    assert [(c["correction_id"], c["kind"], c["reason"], Decimal(c["amount"])) for c in period["corrections"]] == [
        (cid, "plan", reason, a_new["bill"] - a_old["bill"])
    ]
    assert Decimal(period["corrections"][0]["ledger_amount"]) == a_new["overage"] - a_old["overage"]
    assert [c["kind"] for c in doc["corrections"]] == ["usage", "plan"]
    assert Decimal(doc["corrections_total"]) == (a_new["payg"] + a_new["bill"]) - (a_old["payg"] + a_old["bill"])


def test_bills_and_statements_include_the_corrections(clickhouse: Any, tmp_path: Path) -> None:
    events = setup_plan_usage(clickhouse, tmp_path)
    old, new = expected(events, BOOK_BEFORE), expected(events, BOOK_AFTER)
    assert new["acme"]["bill"] != old["acme"]["bill"] and new["initech"]["payg"] != old["initech"]["payg"]

    # -- before: the bills as first computed, no correction ---------------------------------------
    before = bill_preview(clickhouse, "acme", MONTH)
    assert Decimal(before["subtotal"]) == old["acme"]["payg"] + old["acme"]["bill"]
    assert before["corrections"] == [] and Decimal(before["corrections_total"]) == 0
    assert not [ln for ln in before["lines"] if ln["kind"] == "correction"]

    cid = _reprice(clickhouse, BOOK_AFTER, "late price")

    # -- bill preview: the re-rated bill, exact, with the correction as its own lines -------------
    _check_acme(bill_preview(clickhouse, "acme", MONTH), old, new, cid, "late price")
    globex = bill_preview(clickhouse, "globex", MONTH)  # per-million plan: the bill does not move
    assert globex["corrections"] == [] and Decimal(globex["subtotal"]) == new["globex"]["bill"]
    initech = bill_preview(clickhouse, "initech", MONTH)  # pay-per-token: usage as priced + its correction
    assert Decimal(initech["subtotal"]) == new["initech"]["payg"]
    assert [(ln["kind"], Decimal(ln["amount"])) for ln in initech["lines"]] == [
        ("usage", old["initech"]["payg"]),
        ("correction", new["initech"]["payg"] - old["initech"]["payg"]),
    ]

    # -- bill close writes the re-rated bill --------------------------------------------------------
    assert close_period(clickhouse, MONTH, customers=["acme"], closed_at_ms=AT_MS) == 1
    subtotal, total, lines, fee = clickhouse.query(
        "SELECT subtotal, total, lines, fee FROM plan_bills FINAL WHERE customer_id = 'acme'"
    ).result_rows[0]
    assert (subtotal, total) == (new["acme"]["bill"], Decimal(_cents(new["acme"]["bill"])))
    assert fee == Decimal("10.00")  # the plan's own lines stay the bill as rated
    assert [(ln["ref"], Decimal(ln["amount"])) for ln in json.loads(lines) if ln["kind"] == "correction"] == [
        (cid, new["acme"]["bill"] - old["acme"]["bill"])
    ]

    # -- statement: pay-per-token usage as priced + the correction lines = the re-rated charge ----
    st = build_statement(clickhouse, "initech", DEC, JAN)
    assert sum(ln.charge for ln in st.lines) == old["initech"]["payg"]
    assert {c.correction_id for c in st.corrections} == {cid} and all(c.reason == "late price" for c in st.corrections)
    assert sum(c.charge for c in st.corrections) == new["initech"]["payg"] - old["initech"]["payg"]
    assert list(st.totals().values()) == [new["initech"]["payg"]]  # one currency
    assert sum(st.allocated()) == Decimal(_cents(new["initech"]["payg"]))  # lines + corrections add up
    csv_text = render_csv(st)
    assert "correction_id,reason,day,project,provider,model,currency,charge" in csv_text
    assert csv_text.count(cid) == len(st.corrections)
    html_text = render_html(st)
    assert f"correction {cid} (late price)" in html_text and _cents(new["initech"]["payg"]) in html_text.replace(
        ",", ""
    )
    # a plan customer's statement: the plan row is a line of its plan bill, not a usage line
    sa = build_statement(clickhouse, "acme", DEC, JAN)
    assert sa.plan_total == Decimal(_cents(new["acme"]["bill"]))
    assert [(p.kind, p.amount) for p in sa.plan_lines if p.kind == "correction"] == [
        ("correction", new["acme"]["bill"] - old["acme"]["bill"])
    ]
    assert all(ln.provider for ln in sa.lines)  # no merged plan-row line ('' provider) left

    # -- the price restored: a second correction brings the bills back, each visible --------------
    cid2 = _reprice(clickhouse, BOOK_BEFORE, "undo", AT_MS + 1)
    back = bill_preview(clickhouse, "acme", MONTH)
    assert Decimal(back["subtotal"]) == old["acme"]["payg"] + old["acme"]["bill"]
    assert [c["correction_id"] for c in back["periods"][0]["corrections"]] == [cid, cid2]
    assert Decimal(back["corrections_total"]) == 0


_SEED_SCRIPT = """
import json, sys
from pathlib import Path
from meterline.stack.clickhouse import apply_migrations, connect
from tests.jobs.test_bill_corrections import _reprice
from tests.jobs.test_reprice_plans import setup_plan_usage
from tests.jobs.reprice_helpers import BOOK_AFTER
ch = connect(sys.argv[1])
apply_migrations(ch)
setup_plan_usage(ch, Path(sys.argv[2]))
print(_reprice(ch, BOOK_AFTER, "late price"))
ch.close()
"""


def test_cli_bill_preview_close_and_statement_show_the_corrections(tmp_path: Path) -> None:
    """The installed ``meterline`` as a subprocess, on its own embedded engine (seeded and re-rated
    by another process: one process at a time may open an embedded engine)."""
    dsn = f"chdb://{tmp_path / 'engine'}?database=bc"
    root = Path(__file__).resolve().parents[2]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")},
        "METERLINE_CLICKHOUSE_DSN": dsn,
        "METERLINE_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(root),
    }
    seeded = subprocess.run(
        [sys.executable, "-c", _SEED_SCRIPT, dsn, str(tmp_path)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert seeded.returncode == 0, seeded.stderr
    cid = seeded.stdout.strip().splitlines()[-1]
    events = make_events(21, 900)
    old, new = expected(events, BOOK_BEFORE), expected(events, BOOK_AFTER)
    exe = str(Path(sys.executable).with_name("meterline"))

    def run(*args: str) -> str:
        out = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"meterline {' '.join(args)}: {out.stderr}"
        return out.stdout

    _check_acme(
        json.loads(run("bill", "preview", "acme", "--period", MONTH, "--format", "json")), old, new, cid, "late price"
    )
    table = run("bill", "preview", "acme", "--period", MONTH)
    assert "correction" in table and _cents(new["acme"]["payg"] + new["acme"]["bill"]) in table
    run("bill", "close", "--period", MONTH, "--customer", "acme")
    closed = run("sql", "SELECT toString(subtotal) FROM plan_bills FINAL WHERE customer_id = 'acme'", "--format", "csv")
    assert Decimal(closed.strip().splitlines()[-1].strip('"')) == new["acme"]["bill"]
    csv_text = run("statement", "initech", "--period", MONTH, "--format", "csv")
    usage_part, _, corr_part = csv_text.partition("\n\n")
    rows = [r.split(",") for r in corr_part.strip().splitlines()]
    assert rows[0] == ["correction_id", "reason", "day", "project", "provider", "model", "currency", "charge"]
    assert {r[0] for r in rows[1:]} == {cid} and {r[1] for r in rows[1:]} == {"late price"}
    assert sum(Decimal(r[-1]) for r in rows[1:]) == new["initech"]["payg"] - old["initech"]["payg"]
    assert sum(Decimal(r.split(",")[-1]) for r in usage_part.strip().splitlines()[1:]) == old["initech"]["payg"]
