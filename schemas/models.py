"""Pydantic mirrors of the Avro records in ``schemas/avro/`` (the ``.avsc`` files are the source of truth).

Token-count semantics (the canonical rule every adapter normalises to): **the token classes are
disjoint** — every token the provider billed is counted in exactly one class, so
``cost = Σ class_tokens × class_rate`` with no subtraction anywhere in pricing.

- ``input_tokens``: prompt tokens billed at the full input rate. EXCLUDES cached reads and cache
  writes (OpenAI's ``prompt_tokens`` includes ``cached_tokens``: adapters subtract them).
- ``cached_input_tokens``: prompt tokens served from the provider's prompt cache (cache reads).
- ``cache_write_tokens``: prompt tokens written to the cache (Anthropic ``cache_creation_input_tokens``).
- ``output_tokens``: generated tokens billed at the output rate. EXCLUDES reasoning tokens (OpenAI's
  ``completion_tokens`` includes ``reasoning_tokens``: adapters subtract them).
- ``reasoning_tokens``: hidden reasoning / thinking tokens (priced at the reasoning rate, which
  defaults to the output rate).
- ``requests``: number of billable API requests this event stands for (default 1; per-request fees).

Added in UsageEvent **v2** (every field optional with a default, so v1 bytes still decode; see
docs/gateways.md):

- ``cache_write_long_tokens``: cache writes with the LONG retention (Anthropic 1-hour,
  OpenAI 12-hour), priced apart from ``cache_write_tokens`` (the short retention: Anthropic
  5-minute, OpenAI 30-minute, or a provider with one cache-write price).
- ``input_audio_tokens`` / ``output_audio_tokens``: audio tokens (OpenAI audio models, Gemini audio
  input). EXCLUDED from ``input_tokens`` / ``output_tokens``.
- ``input_image_tokens`` / ``output_image_tokens``: image tokens the provider reports apart
  (OpenAI ``image_tokens``, Gemini IMAGE modality). EXCLUDED from input / output.
- ``web_search_requests``: billable web-search tool calls (per-call fee).
- ``service_tier``: the tier the provider served and bills at (``batch``, ``flex``, ``priority``);
  None is the standard tier.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meterline.core.ids import CUSTOMER_ID_PATTERN as CUSTOMER_ID_PATTERN  # re-exported: the contract's rule
from meterline.core.ids import CUSTOMER_ID_RULE, is_customer_id

MAX_ID_LEN = 128

# The customer-id rule is the domain's (meterline/core/ids.py); the contract applies it.
MAX_TOKENS_PER_EVENT = 10**12  # far above any real request; beyond this the count is treated as absurd
MAX_REQUESTS_PER_EVENT = 10**6
MAX_LABELS = 64
MAX_LABEL_LEN = 256

TOKEN_FIELDS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cache_write_long_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
)
#: Tokens classes and counts that UsageEvent v2 added (absent from v1 records: they read as 0).
V2_COUNT_FIELDS: tuple[str, ...] = (
    "cache_write_long_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
    "web_search_requests",
)
#: Per-call tool fees an event counts (field -> price-file fee name).
TOOL_FIELDS: tuple[str, ...] = ("web_search_requests",)


class UsageEvent(BaseModel):
    """One metered request, as a gateway reports it (Avro record ``meterline.v1.UsageEvent``)."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=False)

    event_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    occurred_at: datetime
    customer_id: str = Field(min_length=1, max_length=MAX_ID_LEN)  # form checked by _customer_id_form
    api_key_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    project: str | None = Field(default=None, max_length=MAX_ID_LEN)
    feature: str | None = Field(default=None, max_length=MAX_ID_LEN)
    user_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    session_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    gateway: str | None = Field(default=None, max_length=MAX_ID_LEN)
    provider: str = Field(min_length=1, max_length=MAX_ID_LEN)
    model: str = Field(min_length=1, max_length=MAX_ID_LEN)
    model_version: str | None = Field(default=None, max_length=MAX_ID_LEN)
    request_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    input_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    output_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    cached_input_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    cache_write_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    reasoning_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    cache_write_long_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    input_audio_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    output_audio_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    input_image_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    output_image_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_EVENT)
    requests: int = Field(default=1, ge=0, le=MAX_REQUESTS_PER_EVENT)
    web_search_requests: int = Field(default=0, ge=0, le=MAX_REQUESTS_PER_EVENT)
    service_tier: str | None = Field(default=None, max_length=MAX_ID_LEN)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("occurred_at")
    @classmethod
    def _aware_utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone (UTC)")
        return v.astimezone(UTC)

    @field_validator("customer_id")
    @classmethod
    def _customer_id_form(cls, v: str) -> str:
        if not is_customer_id(v):
            raise ValueError(CUSTOMER_ID_RULE)
        return v

    @field_validator("labels")
    @classmethod
    def _bounded_labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels")
        for k, val in v.items():
            if len(k) > MAX_LABEL_LEN or len(val) > MAX_LABEL_LEN:
                raise ValueError(f"label keys and values are at most {MAX_LABEL_LEN} characters")
        return v
