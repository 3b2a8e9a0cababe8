"""The one producer factory: the settings co-partitioning depends on cannot be changed by a caller."""

from __future__ import annotations

import pytest

from meterline.core.errors import ConfigError
from meterline.stack.kafka import PINNED_PRODUCER_SETTINGS, producer_config


def test_pinned_settings_are_always_present() -> None:
    config = producer_config("127.0.0.1:1", {"linger.ms": 7})
    assert config["linger.ms"] == 7
    for key, value in PINNED_PRODUCER_SETTINGS.items():
        assert config[key] == value
    assert config["partitioner"] == "murmur2_random"


@pytest.mark.parametrize(
    ("key", "value"), [("partitioner", "consistent_random"), ("acks", "1"), ("enable.idempotence", False)]
)
def test_changing_a_pinned_setting_is_refused(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        producer_config("127.0.0.1:1", {key: value})


def test_restating_a_pinned_setting_is_fine() -> None:
    assert producer_config("127.0.0.1:1", {"acks": "all", "enable.idempotence": "true"})["acks"] == "all"
