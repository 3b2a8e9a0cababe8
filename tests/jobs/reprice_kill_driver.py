"""Driver for the SIGKILL test of re-rating (tests/jobs/test_reprice.py): each call is a separate
process on one embedded engine. ``seed DSN`` stores priced usage; ``apply DSN OUT KILL_AT`` re-rates
and applies, appending every ledger command sent to OUT (the stand-in for ledger-commands) and
SIGKILLing itself at step KILL_AT (0 = never); ``totals DSN`` prints the rollups and runs as JSON."""

from __future__ import annotations

import json
import os
import signal
import sys

from jobs.reprice.apply import apply_plan
from jobs.reprice.compute import Filters, open_reprice
from meterline.stack.clickhouse import apply_migrations, connect
from tests.jobs.reprice_helpers import BOOK_AFTER, BOOK_BEFORE, T0, engine, insert_priced, make_events


def main(argv: list[str]) -> None:
    cmd, dsn = argv[0], argv[1]
    ch = connect(dsn)
    apply_migrations(ch)
    if cmd == "seed":
        insert_priced(ch, make_events(41, 800), engine(BOOK_BEFORE))
    elif cmd == "apply":
        out, kill_at = argv[2], int(argv[3])
        steps = [0]

        def on_step(_name: str) -> None:
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def send(command: dict) -> None:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(command, sort_keys=True) + "\n")

        with open_reprice(ch, engine(BOOK_AFTER), Filters(T0, T0 + 31 * 86400)) as rp:
            rp.report()
            res = apply_plan(
                ch,
                rp,
                ran_by="kill-test",
                reason="kill",
                command="driver",
                send=send,
                at_ms=(T0 + 40 * 86400) * 1000,
                on_step=on_step,
            )
        print(json.dumps({"noop": res.noop, "id": res.correction_id, "resumed": res.resumed}))
    elif cmd == "totals":
        rows = ch.query("SELECT customer_id, toString(sum(charge)) FROM usage_hourly GROUP BY customer_id").result_rows
        runs = ch.query("SELECT correction_id, status FROM reprice_runs FINAL ORDER BY correction_id").result_rows
        print(json.dumps({"hourly": {str(c): str(v) for c, v in rows}, "runs": [list(r) for r in runs]}))
    ch.close()


if __name__ == "__main__":
    main(sys.argv[1:])
