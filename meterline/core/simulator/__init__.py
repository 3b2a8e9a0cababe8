"""The plan simulator's pure parts (issue #13): exact break-even curves and the HTML report.

The I/O (ClickHouse aggregation, the price book for routing) is in :mod:`jobs.plans.simulate`;
rating itself is :mod:`meterline.core.plans` (the same code as billing). See ``docs/plans.md``.
"""

from __future__ import annotations

from meterline.core.simulator._breakeven import (
    PL,
    Mix,
    crossings,
    curve_points,
    fraction_json,
    mix_of,
    payg_curve,
    plan_curve,
)

__all__ = ["PL", "Mix", "crossings", "curve_points", "fraction_json", "mix_of", "payg_curve", "plan_curve"]
