"""What every CLI module does the same way: read the settings, and stop with an error line.

One copy for ``cli``, ``cli_credits``, ``cli_plans`` and ``cli_roles`` (they import these under their
old private names), so a configuration error reads the same, with the same exit code, everywhere.
"""

from __future__ import annotations

import typer

from meterline.core.config import Settings
from meterline.shell.console import make_console

_err = make_console(stderr=True)


def load_settings() -> Settings:
    """The settings from the environment; invalid ones print plainly and exit 2."""
    try:
        return Settings()
    except Exception as exc:  # pydantic ValidationError: show it plainly and stop
        _err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from exc


def fail(exc: BaseException, code: int = 1) -> typer.Exit:
    """Print ``error: <exc>`` on stderr and return the exit to raise."""
    _err.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code)
