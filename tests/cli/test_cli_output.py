"""Output to a non-terminal (issue #11): never soft-wrapped, tables whole.

Runs the installed ``meterline`` the way CI, ``| tee`` and log collectors do: stdout and stderr
are a file or a pipe, and ``COLUMNS`` is unset (rich would otherwise lay everything out at 80
columns). A message must reach them on one line, however long its path, and a table must not be
squeezed (a header or row split over two lines, a cell cut with an ellipsis).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from meterline.core.pricing import TOKEN_CLASSES

METERLINE = str(Path(sys.executable).parent / "meterline")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_") and k not in ("COLUMNS", "LINES")}
    env["METERLINE_DATA_DIR"] = str(tmp_path / "data")
    return env


def _deep_dir(tmp_path: Path) -> Path:
    deep = tmp_path.joinpath(*["a-directory-with-a-rather-long-name"] * 7)  # ~250 characters
    deep.mkdir(parents=True)
    return deep


def test_errors_about_a_long_path_reach_a_redirected_stderr_on_one_line(tmp_path: Path) -> None:
    deep = _deep_dir(tmp_path)
    prices = deep / "prices.yaml"
    prices.write_text(
        "currency: USD\nprices:\n  - provider: meta\n    model: llama-3-70b\n"
        '    effective_from: "2024-01-01T00:00:00Z"\n    per_million: {bogus: "1"}\n'
    )
    err_file = tmp_path / "stderr.txt"
    with err_file.open("w") as err:  # stderr to a file, stdout to a pipe
        proc = subprocess.run(
            [METERLINE, "prices", "load", str(prices)],
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    text = err_file.read_text()
    assert proc.returncode == 2, text
    # The whole message on one line (rich at 80 columns broke it after "unknown token class").
    message = f"unknown token class 'bogus'; known: {', '.join(TOKEN_CLASSES)}"
    assert f"error: prices[0].per_million.bogus: {message}\n" in text, text

    # A usage error that typer reports itself: the full path on one line, not inside an 80-column panel.
    missing = deep / "missing-prices-file.yaml"
    proc = subprocess.run(
        [METERLINE, "prices", "load", str(missing)], env=_env(tmp_path), capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "does not exist" in line]
    assert len(lines) == 1 and f"'{missing}'" in lines[0], proc.stderr
    assert "╭" not in proc.stderr and "│" not in proc.stderr, proc.stderr


def test_a_table_printed_to_a_pipe_is_whole(tmp_path: Path) -> None:
    # `stripe sync` on an empty data dir (embedded ClickHouse, bundled local Stripe) prints a
    # ten-column table wider than 80 columns.
    proc = subprocess.run(
        [METERLINE, "stripe", "sync", "--no-progress"], env=_env(tmp_path), capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "…" not in proc.stdout, proc.stdout
    header = [line for line in lines if line.startswith("┃")]
    assert len(header) == 1, proc.stdout  # one header line: no column title wrapped onto a second one
    columns = ("windows", "planned", "resent", "sent", "acked", "carried", "credited", "retries", "too old", "failed")
    assert [cell.strip() for cell in header[0].strip("┃").split("┃")] == list(columns), proc.stdout
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) == 1 and [cell.strip() for cell in rows[0].strip("│").split("│")] == ["0"] * 10, proc.stdout
    assert len(header[0]) > 80  # the case that used to be squeezed into rich's default width


def test_captured_output_for_a_forwarded_command_is_not_wrapped_and_its_tables_are_whole() -> None:
    # What `meterline up` renders for a CLI that forwarded its command (POST /v1/admin/run).
    import io

    from rich.table import Table

    from meterline.shell.console import capture_console

    buf = io.StringIO()
    console = capture_console(buf, width=100)
    long_line = "error: " + "/a-directory-with-a-rather-long-name" * 8 + " is owned by process 42"
    console.print(long_line)
    table = Table(title="t")
    for col in ("customer", "meter", "clickhouse", "pushed", "stripe", "unpushed", "drift"):
        table.add_column(col)
    table.add_row("a-customer-with-a-long-name", "tokens", "15000000", "0", "0", "15000000", "ok")
    console.print(table)
    lines = buf.getvalue().splitlines()
    assert lines[0] == long_line
    assert "…" not in buf.getvalue() and len([line for line in lines if line.startswith("│")]) == 1
