"""The routing what-if file: which models' requests would go to a cheaper substitute.

```yaml
routes:
  - from: {provider: anthropic, model: claude-3-opus}
    to: {provider: anthropic, model: claude-3-haiku}   # model_version: optional
    under_tokens: 2000      # optional: only requests with fewer tokens (all classes) than this
```

Validated as strictly as a price file: unknown keys, empty names, a non-integer or non-positive
``under_tokens`` and a model routed twice are errors (InputError), never silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meterline.core.errors import InputError

__all__ = ["Route", "load_routing"]


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    model: str
    to_provider: str
    to_model: str
    to_model_version: str | None = None
    under_tokens: int | None = None

    @property
    def label(self) -> str:
        cond = "" if self.under_tokens is None else f" (requests under {self.under_tokens} tokens)"
        return f"{self.provider}/{self.model} -> {self.to_provider}/{self.to_model}{cond}"

    def to_json(self) -> dict[str, Any]:
        return {
            "from": {"provider": self.provider, "model": self.model},
            "to": {"provider": self.to_provider, "model": self.to_model, "model_version": self.to_model_version},
            "under_tokens": self.under_tokens,
        }


def _name(d: Mapping[str, Any], key: str, where: str, optional: bool = False) -> str | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v.strip():
        raise InputError(f"{where}.{key}: expected a non-empty string", field=f"{where}.{key}")
    return v


def _keys(d: Any, allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise InputError(f"{where}: expected a mapping", field=where)
    extra = set(d) - allowed
    if extra:
        raise InputError(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))}", field=where)
    return d


def load_routing(source: str | Path | Mapping[str, Any]) -> tuple[Route, ...]:
    """Parse a routing file (YAML or JSON path, or an already-parsed mapping)."""
    if isinstance(source, Mapping):
        doc: Any = source
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read routing file {path}: {exc}", field="routing") from exc
        try:
            doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise InputError(f"routing file {path}: {exc}", field="routing") from exc
    doc = _keys(doc, {"routes"}, "routing")
    entries = doc.get("routes")
    if not isinstance(entries, list) or not entries:
        raise InputError("routing.routes: expected a non-empty list", field="routing.routes")
    out: list[Route] = []
    seen: set[tuple[str, str]] = set()
    for i, e in enumerate(entries):
        w = f"routes[{i}]"
        e = _keys(e, {"from", "to", "under_tokens"}, w)
        src = _keys(e.get("from"), {"provider", "model"}, f"{w}.from")
        dst = _keys(e.get("to"), {"provider", "model", "model_version"}, f"{w}.to")
        n = e.get("under_tokens")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise InputError(f"{w}.under_tokens: expected a positive integer", field=f"{w}.under_tokens")
        r = Route(
            str(_name(src, "provider", f"{w}.from")),
            str(_name(src, "model", f"{w}.from")),
            str(_name(dst, "provider", f"{w}.to")),
            str(_name(dst, "model", f"{w}.to")),
            _name(dst, "model_version", f"{w}.to", optional=True),
            n,
        )
        if (r.provider, r.model) in seen:
            raise InputError(f"{w}: {r.provider}/{r.model} is routed twice", field=w)
        if (r.provider, r.model) == (r.to_provider, r.to_model):
            raise InputError(f"{w}: a model cannot be routed to itself", field=w)
        seen.add((r.provider, r.model))
        out.append(r)
    return tuple(out)
