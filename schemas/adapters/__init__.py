"""Provider usage adapters: a provider response's usage block → :class:`schemas.models.UsageEvent`.

Every adapter normalises to meterline's disjoint token classes and raises
:class:`meterline.core.errors.InvalidEvent` (``invalid_input``, ``missing_usage``, ``invalid_usage``,
``inconsistent_usage``, ``ambiguous_usage``, ``unsupported_usage``, ``missing_event_id``,
``missing_field``) rather than emit a guessed or zero-cost event. ``response`` may be the provider
SDK's object, a dict (snake_case or camelCase) or JSON text. Provider and model names go through
:func:`meterline.core.naming.normalize_model`. Signature style::

    usage_event_from_openai_chat(response, *, customer_id, event_id=None, occurred_at=None, **context)

where ``context`` is any of ``api_key_id, project, feature, user_id, session_id, gateway, labels,
requests, request_id, service_tier``. See docs/gateways.md.
"""

from __future__ import annotations

from schemas.adapters.anthropic import AnthropicMessageStream, usage_event_from_anthropic
from schemas.adapters.gemini import GeminiStream, usage_event_from_gemini
from schemas.adapters.litellm import usage_event_from_litellm
from schemas.adapters.openai import OpenAIChatStream, usage_event_from_openai_chat, usage_event_from_openai_response
from schemas.adapters.openrouter import OpenRouterStream, usage_event_from_openrouter

__all__ = [
    "AnthropicMessageStream",
    "GeminiStream",
    "OpenAIChatStream",
    "OpenRouterStream",
    "usage_event_from_anthropic",
    "usage_event_from_gemini",
    "usage_event_from_litellm",
    "usage_event_from_openai_chat",
    "usage_event_from_openai_response",
    "usage_event_from_openrouter",
]
