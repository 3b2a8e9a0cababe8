"""Reading catalog files exactly: the one reader behind price files and plan files.

Both are YAML or JSON written by people and turned into money, so both get the same rules:
a float scalar is kept as the Decimal of its text (never a binary float), a timestamp stays text
(parsed strictly later), a mapping that repeats a key is refused (plain YAML and JSON silently keep
the last one), and an amount with more decimals than the engine carries is refused, never rounded.
Each caller names its own error class (``PriceFileError``, ``PlanFileError``), so a message says
which file was wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from meterline.core.errors import InputError

__all__ = ["read_catalog", "scaled_int", "to_decimal"]


def _loader(error: type[InputError]) -> type[yaml.SafeLoader]:
    class ExactLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int)) and key in seen:
                    line = key_node.start_mark.line + 1
                    raise error(f"line {line}: duplicate key {key!r}", field=f"line {line}")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    def construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        text = str(loader.construct_scalar(node))
        try:
            d: Decimal | None = Decimal(text.replace("_", ""))
        except InvalidOperation:
            d = None
        if d is None or not d.is_finite():
            line = node.start_mark.line + 1
            raise error(
                f'line {line}: {text!r} is not a finite decimal number; quote amounts, e.g. "2.50"',
                field=f"line {line}",
            )
        return d

    def construct_timestamp(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        return str(loader.construct_scalar(node))

    ExactLoader.add_constructor("tag:yaml.org,2002:float", construct_float)
    ExactLoader.add_constructor("tag:yaml.org,2002:timestamp", construct_timestamp)
    return ExactLoader


def read_catalog(
    source: str | Path | Mapping[str, Any], *, error: type[InputError], what: str, top: str
) -> Mapping[str, Any]:
    """The top-level mapping of a catalog ``source``: a mapping as is, a path (``.yaml``, ``.yml``,
    ``.json``), or the text itself. ``what`` names the file kind in messages ("price file") and
    ``top`` its required keys ("'currency' and 'prices'")."""
    if isinstance(source, Mapping):
        return source
    is_json = False
    if isinstance(source, Path) or ("\n" not in source and source.rstrip().endswith((".yaml", ".yml", ".json"))):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise error(f"cannot read {what} {path}: {exc}", field="source") from None
        is_json = path.suffix.lower() == ".json"
    else:
        text = source
    is_json = is_json or text.lstrip().startswith("{")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise error(f"duplicate key {k!r}", field=k)
            out[k] = v
        return out

    try:
        if is_json:
            data = json.loads(text, parse_float=Decimal, object_pairs_hook=no_duplicates)
        else:
            data = yaml.load(text, Loader=_loader(error))
    except (ValueError, yaml.YAMLError) as exc:
        raise error(f"{what} is not valid {'JSON' if is_json else 'YAML'}: {exc}", field="source") from None
    if not isinstance(data, Mapping):
        raise error(f"{what}: the top level must be a mapping with {top}", field="source")
    return data


def to_decimal(value: Any, *, where: str, error: type[InputError]) -> Decimal:
    """A non-negative finite Decimal from an int, Decimal or numeric string; floats are refused."""
    if isinstance(value, (bool, float)):
        raise error(
            f'{where}: {value!r} is a binary float; write the amount as a quoted decimal string, e.g. "2.50"',
            field=where,
        )
    if isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, Decimal):
        d = value
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            raise error(f"{where}: {value!r} is not a decimal number", field=where) from None
    else:
        raise error(f"{where}: expected a decimal number, got {type(value).__name__}", field=where)
    if not d.is_finite():
        raise error(f"{where}: {value!r} is not a finite number", field=where)
    if d < 0:
        raise error(f"{where}: {value!r} is negative", field=where)
    return d


def scaled_int(d: Decimal, places: int, *, where: str, what: str, error: type[InputError], why: str) -> int:
    """``d × 10**places`` as an exact int; more than ``places`` decimals raises ``error`` (``why``
    says why nothing is rounded)."""
    _sign, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    n = int("".join(map(str, digits)) or "0")
    shift = exp + places
    if shift >= 0:
        n *= int(10**shift)
    else:
        q, r = divmod(n, int(10 ** (-shift)))
        if r:
            raise error(f"{where}: {format(d, 'f')} has more than {places} decimal places {what}; {why}", field=where)
        n = q
    return -n if _sign else n
