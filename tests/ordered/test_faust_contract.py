"""Pins every private faust API meterline depends on (pipeline/delivery.py says why each is used).

A faust upgrade that renames, removes or re-signs one of them fails here, by name, instead of
silently breaking ordering, recovery or the commit order.
"""

from __future__ import annotations

import inspect

import faust
from faust.tables.base import Collection
from faust.transport.consumer import Consumer

from pipeline import delivery


def test_faust_version_is_the_one_the_contract_was_written_for() -> None:
    assert faust.__version__ == delivery.FAUST_VERSION


def test_consumer_keeps_a_read_offset_per_partition() -> None:
    # read_offsets() reads Consumer._read_offset, set up in Consumer.__init__.
    assert "self._read_offset" in inspect.getsource(Consumer.__init__)


def test_consumer_commit_takes_offsets_and_returns_bool() -> None:
    sig = inspect.signature(Consumer._commit)
    assert list(sig.parameters) == ["self", "offsets"]
    assert inspect.iscoroutinefunction(Consumer._commit)


def test_commit_offsets_flushes_the_producer_before_committing() -> None:
    # The agents' commit contract: sends made while handling a record are acknowledged before its
    # offset commits, because _commit_offsets awaits producer.flush() before _commit().
    src = inspect.getsource(Consumer._commit_offsets)
    assert src.index("await self.app.producer.flush()") < src.index("await self._commit(")


def test_send_changelog_signature() -> None:
    sig = inspect.signature(Collection.send_changelog)
    assert list(sig.parameters)[:4] == ["self", "partition", "key", "value"]
    assert {"key_serializer", "value_serializer"} <= set(sig.parameters)


def test_tables_expose_their_store_as_data() -> None:
    assert isinstance(inspect.getattr_static(Collection, "data"), property)


def test_aiokafka_driver_builds_its_consumer_from_the_module_attribute() -> None:
    from faust.transport.drivers import aiokafka as driver

    assert hasattr(driver, "aiokafka") and hasattr(driver.aiokafka, "AIOKafkaConsumer")
    assert "aiokafka.AIOKafkaConsumer(" in inspect.getsource(driver)
    assert "fetch_max_wait_ms" in inspect.getsource(driver)


def test_recovery_seeks_after_on_recovery_completed_callback() -> None:
    # The credit agent commits the table's resume offsets in on_recover, relying on faust seeking
    # stream partitions to committed offsets after the callback (tables/recovery.py).
    from faust.tables.recovery import Recovery

    src = inspect.getsource(Recovery)
    assert "on_recovery_completed" in src and "perform_seek" in src
