"""High (issue #20): POST /v1/admin/run never writes a file on the server (`statement --out`), and
validates the statement's arguments as the CLI does — on the real `up` stack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meterline.shell.cli_stripe import run_captured
from tests.security.conftest import Stack

pytestmark = pytest.mark.broker


def test_statement_out_is_refused_and_nothing_is_written(stack: Stack, tmp_path: Path) -> None:
    target = tmp_path / "evil.pth"
    relative = f"evil-{os.getpid()}.pth"
    base = ["statement", "acme", "--period", "2026-01", "--format", "csv"]
    for argv in (
        [*base, "--out", str(target)],
        [*base, f"--out={target}"],
        [*base, "--out", relative],
        [*base, "--out", str(stack.settings.data_dir / ".." / "elsewhere.csv")],
        ["statement", "--out", str(target), "--period", "2026-01", "--", "acme"],
    ):
        r = stack.http.post("/v1/admin/run", headers=stack.admin, json={"argv": argv})
        assert r.status_code == 400 and r.json()["error"]["code"] == "option_not_allowed", (argv, r.text)
    assert not target.exists() and not Path(relative).exists() and not (Path.cwd() / relative).exists()
    assert not (stack.settings.data_dir.parent / "elsewhere.csv").exists()

    # Even if a caller got past the route's check, the command itself refuses --out inside up.
    run = run_captured([*base, "--out", str(target)], stack.settings)
    assert run.exit_code == 2 and "--out is not available inside meterline up" in run.stderr.replace("\n", " ")
    assert not target.exists()

    # Without --out the statement comes back to the caller.
    r = stack.http.post("/v1/admin/run", headers=stack.admin, json={"argv": base})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    assert r.json()["stdout"].splitlines()[0].startswith("day")


def test_statement_customer_argument_is_validated(stack: Stack) -> None:
    for customer in ("acme\nimport os; os.system('id')\n", "../acme", "\u202eacme"):
        r = stack.http.post(
            "/v1/admin/run",
            headers=stack.admin,
            json={"argv": ["statement", "--period", "2026-01", "--format", "csv", "--", customer]},
        )
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["exit_code"] == 2 and "bad customer id" in doc["stderr"], doc
        assert "import os" not in doc["stdout"]
