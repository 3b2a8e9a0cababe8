from __future__ import annotations

import ast
from pathlib import Path

import meterline.core.pricing as pricing


def test_public_surface_is_pinned() -> None:
    assert sorted(pricing.__all__) == [
        "ImportReport",
        "Override",
        "PICOS_PER_UNIT",
        "PriceBook",
        "PriceVersion",
        "PricedAmounts",
        "PricingEngine",
        "RateCard",
        "Rates",
        "TOKEN_CLASSES",
        "import_litellm",
        "load_price_book",
    ]


def test_pricing_is_pure_and_float_free() -> None:
    banned_modules = {"confluent_kafka", "faust", "clickhouse_connect", "chdb", "stripe", "httpx"}
    for path in Path(pricing.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            assert not names & banned_modules, (path.name, names)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "float", path.name
            if isinstance(node, ast.Constant):
                assert not isinstance(node.value, float), (path.name, node.value)
