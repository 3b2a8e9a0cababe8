"""The house plan, enforced: which layer may import which, no import cycles, an I/O-free core.

The layers, from the ground up (docs/architecture.md draws them):

====  ======================  =====================================================================
rank  packages                what lives there
====  ======================  =====================================================================
0     ``meterline.core``      errors, settings, money, pricing, ledger, plans: pure domain, no I/O
1     ``schemas``             the contracts: Avro schemas and one codec per topic, models,
                              validation, provider adapters (pure as well)
2     ``meterline.stack``     adapters to the outside: broker, ClickHouse, topics, Kafka producer
                              factory and compacted-topic reader, the producer SDK, analytics SQL,
                              metrics, private files
2     ``meterline.``          drop-in integrations that run inside a gateway (the LiteLLM
      ``integrations``        callback)
3     ``pipeline``            agents and sinks, one folder per concept (credits/, alerts/, ...)
4     ``jobs``                batch jobs that read ClickHouse and the ledger and talk to Stripe
5     ``meterline.shell``     the CLI, ``meterline up`` (runtime), the HTTP API, the demo
6     ``devtools``            dev tools outside the product: the local Stripe server, ``verify``
====  ======================  =====================================================================

A module may import from its own rank or below, never above. The exceptions are listed in
``UPWARD`` with the reason for each; a new upward import fails this test until it is either
removed or justified there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS: list[tuple[str, int]] = [
    ("meterline.core", 0),
    ("schemas", 1),
    ("meterline.stack", 2),
    ("meterline.integrations", 2),
    ("pipeline", 3),
    ("jobs", 4),
    ("meterline.shell", 5),
    ("devtools", 6),
]
PACKAGES = ("meterline", "schemas", "pipeline", "jobs", "devtools")

# Upward imports that are allowed, each with its reason. Keys are (importer, imported) module names.
UPWARD: dict[tuple[str, str], str] = {
    ("meterline.shell.cli", "devtools.verify"): "the CLI mounts `meterline verify`, the chaos tool's command",
    (
        "meterline.shell.cli_stripe",
        "devtools.stripe_local",
    ): "with no Stripe key, a stripe command starts the bundled Stripe-compatible server for its run",
    (
        "meterline.shell.demo_billing",
        "devtools.stripe_local",
    ): "the demo closes its billing period in the bundled Stripe-compatible server",
}

# Libraries the pure core and the contracts must never import (I/O, network, processes).
IO_LIBRARIES = {
    "confluent_kafka",
    "aiokafka",
    "faust",
    "mode",
    "clickhouse_connect",
    "chdb",
    "stripe",
    "httpx",
    "requests",
    "starlette",
    "uvicorn",
    "socket",
    "sqlite3",
    "subprocess",
    "urllib.request",
    "http.client",
    "http.server",
    "asyncio",
    "prometheus_client",
    "playwright",
    "litellm",
    "openai",
    "anthropic",
    "os.system",
    "shutil",
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), rank)
    return None if best is None else best[1]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    is_pkg = MODULES[module].name == "__init__.py"
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set[str]:
    """Every project module (and third-party top-level name) that ``module`` imports, anywhere in it."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            out.add(target)
            for alias in node.names:  # ``from pkg import submodule``
                if f"{target}.{alias.name}" in MODULES:
                    out.add(f"{target}.{alias.name}")
    return out


def _project(name: str) -> str | None:
    """The project module a dotted import name refers to (longest known prefix), if any."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in MODULES:
            return candidate
    return None


def test_every_module_has_a_layer() -> None:
    homeless = sorted(m for m in MODULES if layer_of(m) is None and m != "meterline")
    assert not homeless, f"modules outside every layer (add them to a layer folder): {homeless}"


def test_imports_only_go_down() -> None:
    violations = []
    for module in sorted(MODULES):
        mine = layer_of(module)
        if mine is None:
            continue
        for name in sorted(imports_of(module)):
            target = _project(name)
            if target is None:
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > mine and (module, target) not in UPWARD:
                violations.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not violations, "imports that run up the layers:\n" + "\n".join(violations)


@pytest.mark.parametrize("prefix", ["meterline.core", "schemas"])
def test_core_and_contracts_import_no_io(prefix: str) -> None:
    bad = []
    for module in sorted(MODULES):
        if module == prefix or module.startswith(prefix + "."):
            for name in imports_of(module):
                if any(name == lib or name.startswith(lib + ".") for lib in IO_LIBRARIES):
                    bad.append(f"{module} imports {name}")
    assert not bad, "I/O in the pure layers:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = {m: {t for n in imports_of(m) if (t := _project(n)) and t != m} for m in MODULES}
    # A package's __init__ re-exporting its own private modules is not a cycle of design:
    # drop edges from a private module up to its own package face.
    for m, targets in graph.items():
        graph[m] = {t for t in targets if not (m.startswith(t + "."))}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
