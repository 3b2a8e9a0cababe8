"""The numpy kernel of :meth:`PricingEngine.price_batch`: int64 picos, exact to the pico.

Same contract as :meth:`PricingEngine.price_many` (element ``i`` is what ``price(records[i])``
returns, or the :class:`UnpriceableEvent` it raises), computed as columns:

1. the six base counts of every event (input, output, cached input, cache write, reasoning,
   requests) into one ``n × 6`` int64 matrix;
2. the rates of every event's (customer card, price version) run — the loop entries the engine
   already resolves once per distinct key (``_batch_entries``) — into a ``k × 6`` matrix for the
   list cost and one for the charge, and each event's run index;
3. cost = Σ_j counts[i, j] × cost_rates[run(i), j], charge likewise: two numpy expressions.

**Overflow bound (why int64 is exact here).** Counts and rates are integers; for every event and
every partial sum of its six terms, ``|Σ_j c_ij r_ij| <= Σ_j C_j R_j =: B`` where ``C_j`` is the
largest ``|count|`` of column ``j`` over the batch and ``R_j`` the largest ``|rate|`` of column
``j`` over the batch's runs. ``B`` is computed with Python integers (unbounded). If ``B <= 2**63 - 1``
no product and no partial sum leaves int64, so numpy's wrapping arithmetic never wraps and every
result equals the Python-int result. If ``B`` is larger (counts near the validated maximum of
10^12 tokens times a dear rate), or a count or rate does not fit int64 at all, the whole batch
is priced by :meth:`PricingEngine.price_many` with Python ints instead. Nothing is float.

Events the columns do not cover go through :meth:`PricingEngine.price` one by one, exactly as
in ``price_many``: unknown models, a price change inside the batch's time range, a service tier,
v2 token classes or tool calls, and a cached/cache-write count without a rate (the error).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt

INT64_MAX = 2**63 - 1
#: Below this many events the per-event loop of ``price_many`` is as fast (numpy's fixed cost).
MIN_BATCH = 32

_COUNTS = itemgetter(
    "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens", "requests"
)


def overflow_bound(max_counts: Sequence[int], max_rates: Sequence[int]) -> int:
    """``Σ_j max|count_j| × max|rate_j|``: bounds every product and partial sum of a batch's events."""
    return sum(abs(c) * abs(r) for c, r in zip(max_counts, max_rates, strict=True))


def count_matrix(records: Sequence[Mapping[str, Any]]) -> npt.NDArray[np.int64] | None:
    """The six base counts of every record as an ``n × 6`` int64 matrix; None when a count is not
    an int64 integer (a float, a string, an int beyond int64: the caller prices with Python)."""
    try:
        counts = np.array(list(map(_COUNTS, records)))
    except (OverflowError, ValueError, TypeError):
        return None
    if counts.dtype != np.int64 or counts.shape != (len(records), 6):
        return None
    return counts


def dot_runs(
    counts: npt.NDArray[np.int64], rate_rows: Sequence[Sequence[int]], run_of: npt.NDArray[np.intp]
) -> list[int] | None:
    """``Σ_j counts[i, j] × rate_rows[run_of[i]][j]`` for every event, as Python ints; None when the
    overflow bound (module docstring) exceeds int64 or a rate does not fit it."""
    max_counts = [abs(int(x)) for x in counts.min(axis=0).tolist()] if counts.shape[0] else [0] * 6
    max_counts = [max(a, abs(int(b))) for a, b in zip(max_counts, counts.max(axis=0).tolist())]
    max_rates = [max(abs(x) for x in col) for col in zip(*rate_rows)]
    if max(max_rates) > INT64_MAX or overflow_bound(max_counts, max_rates) > INT64_MAX:
        return None
    rates = np.array(rate_rows, dtype=np.int64)  # fits: each |rate| <= the bound <= INT64_MAX
    return np.einsum("ij,ij->i", counts, rates[run_of]).tolist()  # type: ignore[no-any-return]
