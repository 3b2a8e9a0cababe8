from __future__ import annotations

import pytest

from meterline.core.errors import InvalidEvent
from schemas.adapters import AnthropicMessageStream, usage_event_from_anthropic


def test_message_with_cache_write(payload):
    ev = usage_event_from_anthropic(payload("anthropic_message.json"), customer_id="cus_1", gateway="gw-eu")
    assert ev.event_id == "anthropic:msg_01XFDUDYJgAACzvnptvVoYEL"
    assert (ev.provider, ev.model, ev.model_version) == ("anthropic", "claude-3-5-sonnet", "20241022")
    # Anthropic's input_tokens already excludes the cache: copied as-is
    assert (ev.input_tokens, ev.cache_write_tokens, ev.cached_input_tokens) == (21, 188086, 0)
    assert (ev.output_tokens, ev.reasoning_tokens) == (393, 0)
    assert ev.gateway == "gw-eu"


def test_message_with_cache_read_and_ttl_split(payload):
    ev = usage_event_from_anthropic(
        payload("anthropic_message_cache_read.json"), customer_id="cus_1", provider="bedrock"
    )
    assert (ev.provider, ev.model_version) == ("bedrock", "20250929")
    # 1024 written for 5 minutes, 1024 for 1 hour: priced apart (1.25x and 2x input)
    assert (
        ev.input_tokens,
        ev.cached_input_tokens,
        ev.cache_write_tokens,
        ev.cache_write_long_tokens,
        ev.output_tokens,
    ) == (50, 188086, 1024, 1024, 1503)


def test_ttl_split_must_match_total(payload):
    body = payload("anthropic_message_cache_read.json")
    body["usage"]["cache_creation"]["ephemeral_1h_input_tokens"] = 1
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_anthropic(body, customer_id="c")
    assert exc.value.reason_code == "inconsistent_usage"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("usage"), "missing_usage"),
        (lambda b: b["usage"].pop("output_tokens"), "missing_usage"),
        (lambda b: b["usage"].__setitem__("cache_read_input_tokens", -5), "invalid_usage"),
        (lambda b: b["usage"].__setitem__("usage", "x") or b.__setitem__("usage", [1, 2]), "invalid_usage"),
    ],
)
def test_bad_usage_is_rejected(payload, mutate, reason):
    body = payload("anthropic_message.json")
    mutate(body)
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_anthropic(body, customer_id="c")
    assert exc.value.reason_code == reason


def test_stream_takes_cumulative_usage_from_message_delta(payload):
    stream = AnthropicMessageStream()
    stream.extend(payload("anthropic_stream.jsonl"))
    ev = stream.event(customer_id="cus_4")
    assert ev.event_id == "anthropic:msg_014p7gG3wDgGV9EUtLvnow3U"
    assert (ev.model, ev.model_version) == ("claude-3-haiku", "20240307")
    # input/cache from message_start, final output from message_delta (89, not the initial 2)
    assert (ev.input_tokens, ev.cached_input_tokens, ev.cache_write_tokens, ev.output_tokens) == (472, 1800, 0, 89)


def test_message_delta_can_update_input_counts(payload):
    events = payload("anthropic_stream.jsonl")
    events[-2]["usage"] = {"input_tokens": 480, "cache_read_input_tokens": 1800, "output_tokens": 90}
    stream = AnthropicMessageStream()
    stream.extend(events)
    ev = stream.event(customer_id="c")
    assert (ev.input_tokens, ev.output_tokens) == (480, 90)


@pytest.mark.parametrize("cut", [0, 1, 6])  # nothing / only message_start / everything before message_delta
def test_unfinished_stream_raises_missing_usage(payload, cut):
    stream = AnthropicMessageStream()
    stream.extend(payload("anthropic_stream.jsonl")[:cut])
    with pytest.raises(InvalidEvent) as exc:
        stream.event(customer_id="c")
    assert exc.value.reason_code == "missing_usage"
