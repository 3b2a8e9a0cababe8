from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PAYLOADS = Path(__file__).resolve().parent.parent / "fixtures" / "provider_payloads"


@pytest.fixture
def payload() -> Callable[[str], Any]:
    """Load a recorded provider payload: ``.json`` → dict, ``.jsonl`` → list of dicts."""

    def load(name: str) -> Any:
        path = PAYLOADS / name
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return json.loads(path.read_text())

    return load
