"""Fixtures for the ClickHouse sink tests, on top of tests/conftest.py (``clickhouse``, ``topics``...)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pipeline.sink import ClickHouseSink


@pytest.fixture
def make_sink(kafka_bootstrap: str, topics: dict[str, str], clickhouse: Any) -> Iterator[Callable[..., ClickHouseSink]]:
    """``make(group_id=None, clickhouse=<fixture client>, **kwargs)`` -> a subscribed sink; closed after."""
    made: list[ClickHouseSink] = []
    default_group = f"sink-{uuid.uuid4().hex[:8]}"

    def make(group_id: str | None = None, clickhouse_target: Any = None, **kwargs: Any) -> ClickHouseSink:
        sink = ClickHouseSink(
            kafka_bootstrap,
            group_id or default_group,
            topics["usage-priced"],
            topics["usage-dead-letter"],
            clickhouse_target if clickhouse_target is not None else clickhouse,
            **kwargs,
        )
        made.append(sink)
        return sink

    yield make
    for sink in reversed(made):
        sink.close()
