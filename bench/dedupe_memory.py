"""Benchmark 11: memory of the pricing agent's dedupe state with 1M and 5M distinct events in the window.

A full worker run with 5M events in its window takes longer than the bench budget here, so this
measures the dedupe state itself, each size in a FRESH subprocess (so sizes do not share freed
memory): the process first imports what a worker imports (``pipeline.app``: faust, the pricing
engine, the codecs), then builds

* the dedupe table's values exactly as faust's in-memory store holds them in the worker
  (key ``"<partition>:<offset>"``, value ``{"c": customer_id, "ids": [event_id, ...], "t": ms}``,
  one entry per 500-event record, 1,000 customers, 36-character UUID event ids), then
* :class:`pipeline.processor.DedupeIndex` loaded from those values (what ``_index_partition``
  does after an assignment), plus one lookup per event (new events and seen ones), a record's events at a time as
  the processor asks.

Figures: the process RSS (``VmRSS``) after the imports, after the table values and after the
index; the index's own share (RSS delta) and bytes per entry. "Worker RSS" here = imports + table
values + index: a worker's dedupe state without its consumer buffers or the credit agent's table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import BenchConfig, Result

NAME = "dedupe-memory"
TARGET_MIB = 300  # issue #15: worker RSS with 5M distinct events in the window
TARGET_EVENTS = 5_000_000
RECORD_EVENTS = 500
CUSTOMERS = 1_000


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(n_events: int) -> dict[str, Any]:
    """Run in the subprocess: build the state, return the RSS figures (KiB)."""
    import gc
    import time
    import uuid

    import pipeline.app  # noqa: F401  # the worker's import footprint
    from pipeline.processor import DedupeIndex

    gc.collect()
    base = _rss_kib()
    now = int(time.time() * 1000)
    table: dict[str, dict[str, Any]] = {}
    n_records = (n_events + RECORD_EVENTS - 1) // RECORD_EVENTS
    made = 0
    for r in range(n_records):
        k = min(RECORD_EVENTS, n_events - made)
        ids = [str(uuid.UUID(int=(r << 32) | i, version=4)) for i in range(k)]
        table[f"{r % 8}:{r // 8}"] = {"c": f"cust-{r % CUSTOMERS:05d}", "ids": ids, "t": now}
        made += k
    gc.collect()
    with_table = _rss_kib()
    t = time.perf_counter()
    index = DedupeIndex(35 * 86_400_000)
    for key, value in table.items():
        index.load(key, value)
    load_s = time.perf_counter() - t
    gc.collect()
    with_index = _rss_kib()
    # Every event looked up once (seen), and as many unseen ones: the index answers exactly.
    t = time.perf_counter()
    seen = 0
    many = getattr(index, "first_seen_many", None)
    for value in table.values():
        c = value["c"]
        idents = [(c, e) for e in value["ids"]] + [(c, e + "x") for e in value["ids"]]
        got = many(idents) if many else [index.first_seen(*i) for i in idents]
        seen += sum(g is not None for g in got)
    lookup_s = time.perf_counter() - t
    return {
        "events": n_events,
        "entries": len(index),
        "found": seen,
        "rss_base_kib": base,
        "rss_table_kib": with_table,
        "rss_index_kib": with_index,
        "load_s": round(load_s, 2),
        "lookup_us": round(lookup_s / (2 * n_events) * 1e6, 3),
    }


def _subprocess(n_events: int, timeout: float = 600) -> dict[str, Any]:
    code = f"import json; from bench.dedupe_memory import measure; print(json.dumps(measure({n_events})))"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=timeout, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(cfg: BenchConfig) -> list[Result]:
    out: list[Result] = []
    for n in cfg.dedupe_events:
        m = _subprocess(n)
        mib = m["rss_index_kib"] / 1024
        index_mib = (m["rss_index_kib"] - m["rss_table_kib"]) / 1024
        table_mib = (m["rss_table_kib"] - m["rss_base_kib"]) / 1024
        exact = m["entries"] == n and m["found"] == n
        out += [
            Result(
                NAME,
                f"worker dedupe state, {n:,} distinct events in the window: process RSS",
                round(mib),
                "MiB",
                f"<= {TARGET_MIB} MiB" if n >= TARGET_EVENTS else "",
                (mib <= TARGET_MIB and exact) if n >= TARGET_EVENTS else (None if exact else False),
                f"imports {m['rss_base_kib'] / 1024:.0f} + table values {table_mib:.0f} + index {index_mib:.0f} MiB"
                + ("" if exact else f"; INEXACT: {m['entries']} entries, {m['found']} found"),
                details=m,
            ),
            Result(
                NAME,
                f"dedupe index alone, {n:,} entries",
                round(index_mib * 1024 * 1024 / n),
                "bytes/entry",
                note=f"load {m['load_s']} s; lookup {m['lookup_us']} us (half seen, half new)",
            ),
        ]
    return out
