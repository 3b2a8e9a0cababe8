"""``infra/topics.yaml`` and ``schemas.topics.TOPIC_CODECS`` agree: same topics, same encoding, and
every codec function they name exists."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import yaml

from meterline.stack.topics import default_topics_path
from schemas.topics import TOPIC_CODECS


def _declared() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(default_topics_path().read_text())
    return {t["name"]: t for t in doc["topics"]}


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_declared_topic_has_one_codec_and_no_codec_is_orphaned() -> None:
    assert set(_declared()) == set(TOPIC_CODECS)


@pytest.mark.parametrize("topic", sorted(TOPIC_CODECS))
def test_declared_encoding_matches_the_codec(topic: str) -> None:
    spec, codec = _declared()[topic], TOPIC_CODECS[topic]
    assert spec.get("encoding") == codec.encoding, f"{topic}: topics.yaml says {spec.get('encoding')!r}"
    value = str(spec["value"])
    if codec.encoding == "text":
        assert "text" in value, f"{topic}: value says {value!r}"
    elif codec.encoding == "json":
        assert "JSON" in value and "Avro single-object" not in value, f"{topic}: value says {value!r}"
    else:
        assert "Avro" in value, f"{topic}: value says {value!r}"


@pytest.mark.parametrize("topic", sorted(TOPIC_CODECS))
def test_codec_functions_exist(topic: str) -> None:
    codec = TOPIC_CODECS[topic]
    assert callable(_resolve(codec.encoder))
    assert callable(_resolve(codec.decoder))
