"""The e2e pipeline fixture (real Tansu broker, faust worker, sink, chDB), shared with tests/e2e."""

from __future__ import annotations

from tests.e2e.conftest import pipeline  # noqa: F401 - re-exported fixture
