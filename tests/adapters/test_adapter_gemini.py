from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meterline.core.errors import InvalidEvent
from schemas.adapters import GeminiStream, usage_event_from_gemini


def test_thinking_model(payload):
    ev = usage_event_from_gemini(payload("gemini_generate_content.json"), customer_id="cus_1")
    assert ev.event_id == "gemini:mAitaLmkHPPlz7IPvtfUqQ4"
    assert (ev.provider, ev.model, ev.model_version) == ("google", "gemini-2.5-flash", None)
    # candidatesTokenCount excludes thoughts; both kept as they are
    assert (ev.input_tokens, ev.cached_input_tokens, ev.output_tokens, ev.reasoning_tokens) == (10, 0, 350, 848)
    total = payload("gemini_generate_content.json")["usageMetadata"]["totalTokenCount"]
    assert ev.input_tokens + ev.output_tokens + ev.reasoning_tokens == total


def test_vertex_cached_content_and_tool_prompt(payload):
    ev = usage_event_from_gemini(
        payload("gemini_vertex_cached.json"), customer_id="cus_1", model="gemini-2.0-flash", provider="vertex_ai"
    )
    assert (ev.provider, ev.model, ev.model_version) == ("vertex_ai", "gemini-2.0-flash", "001")
    # promptTokenCount includes the cached content: 33077 - 32768 + 125 tool-use prompt tokens
    assert (ev.input_tokens, ev.cached_input_tokens, ev.output_tokens, ev.reasoning_tokens) == (434, 32768, 412, 0)
    assert ev.occurred_at == datetime(2025, 3, 10, 14, 31, 5, 845321, tzinfo=UTC)
    total = payload("gemini_vertex_cached.json")["usageMetadata"]["totalTokenCount"]
    assert ev.input_tokens + ev.cached_input_tokens + ev.output_tokens == total


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("usageMetadata"), "missing_usage"),
        (lambda b: b["usageMetadata"].pop("promptTokenCount"), "missing_usage"),
        (lambda b: b["usageMetadata"].__setitem__("cachedContentTokenCount", 40000), "inconsistent_usage"),
        (lambda b: b["usageMetadata"].__setitem__("thoughtsTokenCount", -1), "invalid_usage"),
        (lambda b: b.pop("modelVersion"), "missing_field"),
        (lambda b: b.__setitem__("createTime", "yesterday"), "invalid_timestamp"),
    ],
)
def test_bad_usage_is_rejected(payload, mutate, reason):
    body = payload("gemini_vertex_cached.json")
    mutate(body)
    with pytest.raises(InvalidEvent) as exc:
        usage_event_from_gemini(body, customer_id="c")
    assert exc.value.reason_code == reason


def test_stream_last_usage_wins(payload):
    final = payload("gemini_generate_content.json")
    first = {
        "candidates": [{"content": {"parts": [{"text": "AI"}], "role": "model"}}],
        "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10},
        "modelVersion": "gemini-2.5-flash",
        "responseId": final["responseId"],
    }
    stream = GeminiStream()
    stream.extend([first, final])
    ev = stream.event(customer_id="c")
    assert (ev.input_tokens, ev.output_tokens, ev.reasoning_tokens) == (10, 350, 848)
    with pytest.raises(InvalidEvent) as exc:
        GeminiStream().event(customer_id="c")
    assert exc.value.reason_code == "missing_usage"
