"""Hostile-input fixtures: the API test fixtures (real uvicorn on 127.0.0.1) re-exported, and the
invariant suite's seeded RNG + chaos stack."""

from __future__ import annotations

from tests.api.conftest import api_factory, consume_usage, keys, make_event, usage_producer  # noqa: F401  (fixtures)
from tests.invariants.conftest import chaos, rng, seed  # noqa: F401  (fixtures)
