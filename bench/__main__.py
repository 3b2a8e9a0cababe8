"""``python -m bench [--quick] [--only NAME ...] [--events N] [--analytics-rows N]``.

Runs the benchmarks in order, prints one table (figure beside its target) plus the profiles, and
writes ``bench/results/<UTC timestamp>.json`` (git-ignored). Exit status is 0 whenever the
benchmarks ran, whatever the figures: targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import BenchConfig, Result

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCHMARKS = (
    "pricing",
    "processor",
    "dedupe",
    "e2e",
    "latency",
    "authorize",
    "stripe",
    "analytics",
    "simulate",
    "reprice",
)


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def _met(r: Result) -> str:
    return "" if r.met is None else ("yes" if r.met else "NO")


def print_table(results: list[Result]) -> None:
    try:
        from rich.table import Table

        from meterline.shell.console import make_console
    except ImportError:  # plain fallback
        for r in results:
            print(f"{r.benchmark:16} {r.name:58} {_fmt(r.figure):>12} {r.unit:10} {r.target:10} {_met(r):4} {r.note}")
        return
    table = Table(title="meterline benchmarks", show_lines=False)
    for col, kw in (
        ("benchmark", {}),
        ("name", {}),
        ("figure", {"justify": "right"}),
        ("unit", {}),
        ("target", {}),
        ("met?", {}),
        ("note", {"overflow": "fold"}),
    ):
        table.add_column(col, **kw)
    for r in results:
        met = _met(r)
        style = "red" if met == "NO" else None
        table.add_row(r.benchmark, r.name, _fmt(r.figure), r.unit, r.target, met, r.note, style=style)
    make_console().print(table)


def print_profiles(results: list[Result]) -> None:
    for r in results:
        top = r.details.get("profile_top")
        if not top:
            continue
        print(f"\nwhere the time goes: {r.benchmark} / {r.name} (cProfile, by own time)")
        for row in top:
            print(f"  {row['share_pct']:5.1f}%  {row['tottime_s']:8.3f}s  {row['calls']:>9,}  {row['function']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes: the whole suite in under 2 minutes")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    ap.add_argument(
        "--events",
        type=int,
        help="events for the end-to-end run (default 200,000; quick 100,000; the issue asks 1,000,000)",
    )
    ap.add_argument("--analytics-rows", type=int, help="rows for the analytics run (default 10,000,000)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON result")
    args = ap.parse_args(argv)

    cfg = BenchConfig.quick_config() if args.quick else BenchConfig()
    if args.events:
        cfg = dataclasses.replace(cfg, e2e_events=args.events)
    if args.analytics_rows:
        cfg = dataclasses.replace(cfg, analytics_rows=args.analytics_rows)
    wanted = set(args.only or BENCHMARKS)

    from bench import (
        analytics,
        authorize,
        codec_processor,
        dedupe_memory,
        e2e,
        issue15,
        latency,
        pricing_core,
        reprice,
        simulate,
        stripe_sync,
    )
    from bench._stack import Stack

    plain: list[tuple[str, Callable[[BenchConfig], list[Result]]]] = [
        ("pricing", pricing_core.run),
        ("processor", codec_processor.run),
        ("dedupe", dedupe_memory.run),
    ]
    stacked: list[tuple[str, Callable[[BenchConfig, Any], list[Result]]]] = [
        ("e2e", e2e.run),
        ("latency", latency.run),
        ("authorize", authorize.run),
        ("stripe", stripe_sync.run),
        ("analytics", analytics.run),
        ("simulate", simulate.run),
        ("reprice", reprice.run),
    ]
    results: list[Result] = []
    timings: dict[str, float] = {}
    started = time.monotonic()

    def guarded(name: str, call: Callable[[], list[Result]]) -> None:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            got = call()
            results.extend(got)
            for r in got:  # progress, so a long run shows its figures as they come
                print(f"[bench]   {r.name}: {_fmt(r.figure)} {r.unit} {r.note}", file=sys.stderr, flush=True)
        except Exception as exc:
            traceback.print_exc()
            results.append(Result(name, "FAILED", None, note=f"{type(exc).__name__}: {str(exc)[:300]}"))
        timings[name] = round(time.monotonic() - t, 1)
        print(f"[bench] {name} done in {timings[name]} s", file=sys.stderr, flush=True)

    for name, fn in plain:
        if name in wanted:
            guarded(name, lambda fn=fn: fn(cfg))  # type: ignore[misc]
    if wanted & {n for n, _ in stacked}:
        with Stack() as stack:
            for name, sfn in stacked:
                if name in wanted:
                    guarded(name, lambda sfn=sfn: sfn(cfg, stack))  # type: ignore[misc]
    total = round(time.monotonic() - started, 1)

    print_table(results)
    print_profiles(results)
    targets = issue15.summary(results)
    issue15.print_summary(targets)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}.json"
    doc = {
        "started_utc": stamp,
        "config": dataclasses.asdict(cfg),
        "machine": _machine(),
        "seconds": total,
        "seconds_per_benchmark": timings,
        "results": [r.to_json() for r in results],
        "issue15": targets,
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\n{len(results)} figures in {total} s; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
