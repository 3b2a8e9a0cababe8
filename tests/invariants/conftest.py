"""Fixtures of the invariant suite: a seeded RNG (printed, so a failure can be replayed) and a
:class:`devtools.verify.ChaosStack` on the session's Tansu broker and this test's chDB database.

Replay a failing run with ``METERLINE_TEST_SEED=<seed> pytest tests/invariants -k <test>``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.verify import ChaosStack
from meterline.core.config import Settings


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    value = int(os.environ.get("METERLINE_TEST_SEED") or random.randrange(2**32))
    print(f"\n{request.node.nodeid}: seed={value} (replay with METERLINE_TEST_SEED={value})")
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def rng(seed: int) -> random.Random:
    return random.Random(seed)


@pytest.fixture
def chaos(
    kafka_bootstrap: str, topics: dict[str, str], topic_prefix: str, clickhouse: Any, tmp_path: Path
) -> Iterator[ChaosStack]:
    """Topics created, prices published; no worker and no sink started yet."""
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        partitions=4,
        broker_flavor="tansu",
        data_dir=tmp_path,
    )
    stack = ChaosStack(settings, clickhouse, tmp_path / "logs")
    stack.publish_prices()
    try:
        yield stack
    finally:
        stack.close()
