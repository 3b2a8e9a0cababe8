"""The public surface of meterline.core.plans, its purity, and the CLI's validation before any I/O."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import meterline.core.plans as plans

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")


def test_public_surface_is_pinned() -> None:
    assert sorted(plans.__all__) == sorted(
        [
            "EVENT_TYPES",
            "INTERVALS",
            "ON_EXHAUSTED",
            "PICOS_PER_UNIT",
            "PLAN_KEY_PREFIX",
            "TOKEN_CLASSES",
            "Allowance",
            "AllowanceUse",
            "Band",
            "Bill",
            "BillLine",
            "Consumption",
            "ModelScope",
            "Overage",
            "Period",
            "PlanCatalog",
            "PlanFileError",
            "PlanVersion",
            "Rejected",
            "Run",
            "Segment",
            "Split",
            "SubscriptionError",
            "SubscriptionEvent",
            "Terms",
            "TierStep",
            "Timeline",
            "Usage",
            "add_intervals",
            "allowance_remaining",
            "catalog_from_records",
            "consume",
            "decode_plan_record",
            "fold_timeline",
            "format_instant",
            "format_picos",
            "instant_of",
            "load_plan_catalog",
            "overage_price",
            "parse_event",
            "parse_instant",
            "period_bounds",
            "period_index",
            "policy_room",
            "rate_period",
            "rate_periods",
            "round_total",
            "terms_at",
            "terms_for",
            "version_conflicts",
            # live burn-down state (the credit agent)
            "ALERT_PCTS",
            "MAX_FACTS",
            "MAX_SEGMENTS",
            "LivePlan",
            "SegmentUse",
            "alerts_due",
            "allowance_view",
            "burn",
            "gate",
            "live_terms",
            "usage_of_priced",
            # plan corrections (reprice) applied to the live segment
            "MAX_SEGMENT_CORRECTIONS",
            "SegmentChange",
            "correct_segment",
            "segment_consumptions",
        ]
    )
    for name in plans.__all__:
        assert hasattr(plans, name), name


def test_the_domain_imports_no_io() -> None:
    forbidden = (
        "confluent_kafka",
        "faust",
        "clickhouse_connect",
        "chdb",
        "stripe",
        "httpx",
        "starlette",
        "pipeline",
        "jobs",
    )
    for path in (REPO / "meterline" / "plans").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for n in names:
                assert n.split(".")[0] not in forbidden, f"{path.name} imports {n}"


def test_plans_load_rejects_a_bad_file_before_touching_kafka(tmp_path: Path) -> None:
    bad = tmp_path / "plans.yaml"
    bad.write_text(
        'currency: USD\nplans:\n  - {id: pro, version: 1, effective_from: "2026-01-01T00:00:00Z", '
        'interval: month, fee: "-1", overage: {per_million: "30"}}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run(
        [METERLINE, "plans", "load", str(bad)], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "plans[0].fee" in proc.stderr and "negative" in proc.stderr


def test_plans_subscribe_rejects_a_bad_customer_id_before_touching_kafka(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env["METERLINE_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run(
        [METERLINE, "plans", "subscribe", "bad customer", "pro"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "customer_id" in proc.stderr, proc.stdout + proc.stderr
