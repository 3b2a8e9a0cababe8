"""Every console the CLI prints through is built here: one rule for terminals and everything else.

- **A terminal**: rich's defaults (the terminal's width, word wrapping, colour, live displays).
- **Anything else** (a pipe, a file, CI, a buffer captured for ``POST /v1/admin/run``): text is
  never soft-wrapped or cropped, because log collectors, ``grep`` and scripts read it line by line
  (an error about a long path stays on one line), and tables are laid out at their natural width,
  never squeezed into 80 columns (no row split over two lines, no cell cut with an ellipsis).

rich decides "terminal" from the stream's ``isatty()`` and from ``FORCE_COLOR`` / ``TTY_COMPATIBLE``;
here only ``isatty()`` decides the layout, so ``FORCE_COLOR=1`` in CI gives colours but still no
wrapping. The decision is taken when the console is built (the CLI's consoles: at import).

Usage errors that click/typer report themselves (a missing file argument, an unknown option) are
drawn by typer in an 80-column rich panel; :func:`markup_mode` turns that off (plain click output,
one line per message) unless both stdout and stderr are terminals.
"""

from __future__ import annotations

import sys
from typing import IO, Literal

from rich.console import Console

__all__ = ["NON_TERMINAL_WIDTH", "capture_console", "is_terminal", "make_console", "markup_mode"]

# The layout width off a terminal: only tables and other measured renderables use it (text is not
# wrapped at all), and a table takes its natural width up to this, so nothing real is ever squeezed.
NON_TERMINAL_WIDTH = 10_000


def is_terminal(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream is not)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def make_console(*, stderr: bool = False) -> Console:
    """The console for the process's real stdout (or stderr): rich's defaults on a terminal,
    never wrapped and tables whole anywhere else."""
    if is_terminal(sys.stderr if stderr else sys.stdout):
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=NON_TERMINAL_WIDTH, soft_wrap=True)


def capture_console(file: IO[str], *, width: int, color: bool = False) -> Console:
    """A console writing to ``file`` (a buffer whose text is handed to someone else, e.g. the CLI
    that forwarded a command to ``meterline up``): tables laid out for ``width`` columns (the
    reader's terminal, or as wide as allowed when the reader is not one), text never wrapped (the
    reader's terminal wraps long lines itself; a pipe or log keeps them whole)."""
    return Console(
        file=file,
        width=width,
        soft_wrap=True,
        force_terminal=color,
        color_system="standard" if color else None,
        force_jupyter=False,
        force_interactive=False,
    )


def markup_mode() -> Literal["rich"] | None:
    """typer's ``rich_markup_mode``: rich panels for usage errors and help only when both stdout
    and stderr are terminals; None (plain click output, unwrapped messages) otherwise."""
    return "rich" if is_terminal(sys.stdout) and is_terminal(sys.stderr) else None
