"""One model / provider normalisation, shared by every adapter and by the price lookup.

Gateways name the same model differently: Anthropic returns the dated id
``claude-3-5-sonnet-20241022``, OpenRouter says ``anthropic/claude-3.5-sonnet:online``, the Gemini
SDK's default provider is ``gemini`` while price lists say ``google``. If every adapter and the
pricing engine apply :func:`normalize_model`, one price entry prices them all, and
``unknown_model`` means a model really is unknown.

Rules, in order (pure string functions, no fuzzy matching):

1. **Provider**: lower-cased, then :data:`PROVIDER_ALIASES` (``gemini`` → ``google``,
   ``google_ai_studio`` → ``google``, ``mistralai`` → ``mistral``, ``meta-llama`` → ``meta``, ...).
2. **Gateway prefixes**: ``models/`` (Gemini resource names) is dropped.
3. **OpenRouter variant suffixes** (:data:`VARIANT_SUFFIXES`: ``:online``, ``:floor``, ``:nitro``,
   ``:exacto``, ``:thinking``, ``:extended``, ``:beta``) are dropped: they change routing, not the
   token price. ``:free`` is **kept** (a free variant is a different price; it prices only if the
   price file lists it).
4. **Dated snapshots** become ``model_version``: ``-YYYYMMDD`` or ``-YYYY-MM-DD`` at the end
   (``claude-3-5-sonnet-20241022`` → ``claude-3-5-sonnet`` + ``20241022``); for Gemini models
   (any host), also a 3-digit stable-version suffix (``gemini-1.5-pro-002`` → ``gemini-1.5-pro`` +
   ``002``). An explicit
   ``model_version`` the caller passes wins over the suffix.
5. **Anthropic dotted names** (OpenRouter's ``claude-3.5-sonnet``) use Anthropic's dashes
   (``claude-3-5-sonnet``): Anthropic model ids never contain dots.

The price lookup tries the exact normalised ``(provider, model, model_version)`` first, then
``(provider, model, None)`` (see docs/pricing.md), so a dated snapshot without a price of its own
is priced by its model's version-less entry.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = [
    "PROVIDER_ALIASES",
    "VARIANT_SUFFIXES",
    "normalize_model",
    "normalize_provider",
    "normalize_service_tier",
]

PROVIDER_ALIASES: dict[str, str] = {
    "gemini": "google",
    "google_genai": "google",
    "google-genai": "google",
    "google_ai_studio": "google",
    "google-ai-studio": "google",
    "googleai": "google",
    "mistralai": "mistral",
    "meta-llama": "meta",
    "meta_llama": "meta",
    "x-ai": "xai",
}

VARIANT_SUFFIXES: frozenset[str] = frozenset({"online", "floor", "nitro", "exacto", "thinking", "extended", "beta"})

_DATED = re.compile(r"^(?P<base>.+?)-(?P<date>\d{4}-\d{2}-\d{2}|20\d{6})$")
_GOOGLE_STABLE = re.compile(r"^(?P<base>gemini-.+?)-(?P<num>\d{3})$")

#: Service tiers meterline prices apart; everything else a provider reports as its normal tier
#: (``default``, ``auto``, ``standard``, ``on_demand``) is the standard tier (None).
_STANDARD_TIERS = frozenset({"", "default", "auto", "standard", "on_demand", "on-demand"})


def normalize_provider(provider: str) -> str:
    """``"Gemini"`` → ``"google"``; unknown names are only lower-cased."""
    p = provider.strip().lower()
    return PROVIDER_ALIASES.get(p, p)


@lru_cache(maxsize=65_536)
def normalize_model(provider: str, model: str, model_version: str | None = None) -> tuple[str, str, str | None]:
    """The canonical ``(provider, model, model_version)`` of a reported model (rules above)."""
    p = normalize_provider(provider)
    m = model.strip()
    if m.startswith("models/"):
        m = m[len("models/") :]
    base, sep, variant = m.rpartition(":")
    if sep and base and variant in VARIANT_SUFFIXES:
        m = base
    version = model_version
    dated = _DATED.match(m)
    if dated:
        m = dated.group("base")
        version = version or dated.group("date")
    else:
        stable = _GOOGLE_STABLE.match(m)
        if stable:
            m = stable.group("base")
            version = version or stable.group("num")
    if p == "anthropic" and "." in m:
        m = m.replace(".", "-")
    return p, m, version


def normalize_service_tier(tier: str | None) -> str | None:
    """None for the standard tier, else the lower-cased tier name (``batch``, ``flex``, ``priority``)."""
    if tier is None:
        return None
    t = tier.strip().lower()
    if t in _STANDARD_TIERS:
        return None
    if t == "fast":  # OpenAI: "fast" is served (and billed) as priority
        return "priority"
    return t
