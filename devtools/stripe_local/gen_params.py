"""Regenerate ``stripe_params.json``: the request parameters Stripe accepts on each endpoint we serve.

Stripe's request bodies are closed (``additionalProperties: false`` in its OpenAPI description,
github ``stripe/openapi`` ``spec3.json``): an unknown parameter is a 400 ``parameter_unknown``.
The local server enforces the same rule from this file.

Source: the request-parameter types of the pinned stripe-python SDK (``stripe/params/**``, each
file headed "File generated from our OpenAPI spec"), for the API version the SDK pins. They are
read from the installed SDK rather than from a copy of the 7 MB spec, so the list follows the SDK
version in pyproject.toml. Spot checks against ``spec3.json`` are in docs/stripe-local.md.

Run ``python -m devtools.stripe_local.gen_params`` after an SDK upgrade and review the diff.

Format: ``{"POST /v1/prices": {"currency": null, "recurring": {"interval": null, ...},
"metadata": "*", "tiers": {"up_to": null, ...}, ...}}``. ``null`` is a scalar, ``"*"`` a map with
free keys (metadata, currency options), an object the closed set of its keys (lists of objects:
the keys of one element). Endpoint paths use ``{}`` for path arguments.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

import typing_extensions

OUT = Path(__file__).with_name("stripe_params.json")
MAX_DEPTH = 4  # deeper objects are recorded as "*" (not checked): none of them is used by meterline


def _sdk_routes(sdk_root: Path) -> dict[str, str]:
    """``"POST /v1/prices" -> "PriceCreateParams"`` for every synchronous service method of the SDK."""
    out: dict[str, str] = {}
    for path in sdk_root.rglob("_*_service.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            ptype = None
            for arg in fn.args.args:
                if arg.arg == "params" and arg.annotation is not None:
                    text = ast.unparse(arg.annotation)
                    found = re.search(r"['\"](\w+Params)['\"]", text)
                    ptype = found.group(1) if found else None
            for call in ast.walk(fn):
                if not (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "_request"
                    and len(call.args) >= 2
                ):
                    continue
                method, target = call.args[0], call.args[1]
                if isinstance(target, ast.Call) and isinstance(target.func, ast.Attribute):
                    target = target.func.value  # "/v1/x/{id}".format(...)
                if isinstance(method, ast.Constant) and isinstance(target, ast.Constant) and ptype:
                    route = re.sub(r"\{\w+\}", "{}", str(target.value))
                    out[f"{str(method.value).upper()} {route}"] = ptype
    return out


def _param_classes(sdk_root: Path) -> dict[str, str]:
    """Params class name -> module name, for ``stripe/params/**``."""
    out: dict[str, str] = {}
    for path in (sdk_root / "params").rglob("_*.py"):
        mod = "stripe." + ".".join(path.relative_to(sdk_root).with_suffix("").parts)
        for name in re.findall(r"^class (\w+)\(", path.read_text(), re.M):
            out.setdefault(name, mod)
    return out


def _resolve(annotation: Any, owner: type) -> Any:
    """Evaluate one (string / forward-ref) annotation of ``owner`` and drop ``NotRequired[...]``."""
    ns = vars(sys.modules[owner.__module__])
    if isinstance(annotation, typing.ForwardRef):
        annotation = annotation.__forward_arg__
    if isinstance(annotation, str):
        annotation = eval(annotation, dict(ns))  # the SDK's own generated type expressions
    while typing_extensions.get_origin(annotation) in (typing_extensions.NotRequired, typing_extensions.Required):
        annotation = typing_extensions.get_args(annotation)[0]
    if isinstance(annotation, (str, typing.ForwardRef)):
        return _resolve(annotation, owner)
    return annotation


def _tree(tp: Any, depth: int, owner: type) -> Any:
    """The parameter tree of a type: None (scalar), "*" (free map) or {name: subtree}."""
    tp = _resolve(tp, owner)
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        trees = [_tree(a, depth, owner) for a in typing.get_args(tp)]
        objs = [t for t in trees if isinstance(t, dict)]
        if objs:
            merged: dict[str, Any] = {}
            for t in objs:
                merged.update(t)
            return merged
        return "*" if "*" in trees else None
    if origin is list:
        return _tree(typing.get_args(tp)[0], depth, owner)
    if origin is dict or getattr(origin, "__name__", "") == "UntypedStripeObject":
        return "*"
    if isinstance(tp, type) and typing_extensions.is_typeddict(tp):
        if depth >= MAX_DEPTH:
            return "*"
        from stripe._request_options import RequestOptions

        skip = set(RequestOptions.__annotations__) if depth == 0 else set()  # SDK options, not params
        return {k: _tree(v, depth + 1, tp) for k, v in sorted(tp.__annotations__.items()) if k not in skip}
    return None


def generate(routes: list[str]) -> dict[str, Any]:
    import stripe

    sdk_root = Path(stripe.__file__).parent
    sdk = _sdk_routes(sdk_root)
    classes = _param_classes(sdk_root)
    out: dict[str, Any] = {}
    for route in sorted(routes):
        name = sdk.get(route)
        if name is None:
            continue  # not a Stripe API route the SDK knows (none today); left unchecked
        cls = getattr(importlib.import_module(classes[name]), name)
        out[route] = _tree(cls, 0, cls)
    return out


def served_routes() -> list[str]:
    from devtools.stripe_local import _server  # noqa: F401  (registers every handler)
    from devtools.stripe_local._routes import route_keys

    return [k for k in route_keys() if " /v1/" in k or " /v2/" in k]


def main() -> None:
    data = generate(served_routes())
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({len(data)} endpoints)")


if __name__ == "__main__":
    main()
