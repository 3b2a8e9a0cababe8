"""Run a command where the data lives: here, or inside the running ``meterline up``.

With the embedded ClickHouse engine (a ``chdb:`` DSN) only one process may open the engine, and
while ``meterline up`` runs for a data_dir that process is ``up``. Commands that read or write
ClickHouse (``meterline stripe ...``, ``meterline statement``) therefore run inside ``up`` when it
runs: the CLI rebuilds the command line from its parsed parameters (:func:`argv_from_params`),
posts it to the admin-only ``POST /v1/admin/run`` (:func:`forward_to_up`) and prints what came back
(:func:`relay`); ``up`` runs the same command code with :func:`run_captured`. With a ClickHouse
server DSN, or when no ``up`` runs, the command runs here.

A command prints through :func:`current_io` only, so its code is the same in both places: in a
terminal the output goes to the real streams and the settings come from the environment; inside
``up`` both streams are captured and the service's own settings are used.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import typer
from rich.console import Console
from rich.markup import escape

from meterline.core.config import Settings
from meterline.core.errors import MeterlineError
from meterline.shell.console import capture_console, make_console
from meterline.shell.discovery import running_api

__all__ = [
    "CapturedRun",
    "CommandIO",
    "argv_from_params",
    "captured",
    "command_settings",
    "current_io",
    "fail",
    "forward_to_up",
    "relay",
    "report_result",
    "run_captured",
    "run_in_up_if_running",
]

log = logging.getLogger(__name__)


@dataclass
class CommandIO:
    """Where a command's output goes and which settings it uses.

    Every command prints through :func:`current_io` only, so the same command code runs in a terminal
    (the default: ``console`` / ``err`` on the real stdout / stderr, settings from the
    environment) or inside a running ``meterline up`` with both streams captured and the
    service's own settings (see :func:`run_captured`).
    """

    out: Console
    err: Console
    settings: Settings | None = None  # None: read the environment (``Settings()``)
    results: list[Any] = field(default_factory=list)  # summaries the command reported (sync, provision ...)


_IO: ContextVar[CommandIO | None] = ContextVar("meterline_command_io", default=None)


def current_io() -> CommandIO:
    """The current command's output and settings: the captured ones inside ``meterline up``, else
    consoles on the real stdout / stderr (built by :mod:`meterline.shell.console`) and the environment."""
    current = _IO.get()
    return current if current is not None else CommandIO(make_console(), make_console(stderr=True))


def captured() -> bool:
    """True while the command runs inside ``meterline up`` (its output captured for the caller)."""
    return _IO.get() is not None


def command_settings() -> Settings:
    """The settings this command runs with (the service's inside ``meterline up``)."""
    current = _IO.get()
    if current is not None and current.settings is not None:
        return current.settings
    return Settings()


def report_result(result: Any) -> None:
    """Hand a command's summary object to whoever runs it in-process (the periodic sync logs it)."""
    current = _IO.get()
    if current is not None:
        current.results.append(result)


def fail(exc: BaseException, code: int = 1) -> typer.Exit:
    """Print ``exc`` as an error on the command's stderr; the exit to raise."""
    current_io().err.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code)


@dataclass(frozen=True)
class CapturedRun:
    exit_code: int
    stdout: str
    stderr: str
    results: tuple[Any, ...] = ()  # what the command passed to _report (SyncSummary, ProvisionReport ...)


def run_captured(
    command: Any, argv: Sequence[str], settings: Settings, *, width: int = 100, color: bool = False
) -> CapturedRun:
    """Run ``meterline <argv>`` with the click ``command`` in this thread, with ``settings`` instead
    of the environment's and both output streams captured.

    The command's own failures never raise: like in a terminal they are an exit code and text on
    stderr (usage errors exit 2; an unexpected exception is logged with its traceback and exits 1).
    Never forwards to a running ``meterline up`` (this is how ``up`` runs them).
    """
    out_buf, err_buf = io.StringIO(), io.StringIO()
    cio = CommandIO(
        capture_console(out_buf, width=width, color=color), capture_console(err_buf, width=width, color=color), settings
    )
    token = _IO.set(cio)
    try:
        code = _invoke(command, list(argv), cio)
    finally:
        _IO.reset(token)
    return CapturedRun(code, out_buf.getvalue(), err_buf.getvalue(), tuple(cio.results))


def _invoke(command: Any, argv: list[str], cio: CommandIO) -> int:
    try:
        rv = command.main(args=argv, prog_name="meterline", standalone_mode=False)
    except typer.Abort:
        cio.err.file.write("Aborted!\n")
        return 1
    except typer.TyperException as exc:  # click's usage errors: bad option, missing argument ...
        show = getattr(exc, "show", None)
        if callable(show):
            show(file=cio.err.file)
        else:
            cio.err.file.write(f"Error: {exc.format_message()}\n")
        return int(exc.exit_code)
    except Exception as exc:
        log.exception("meterline %s failed", " ".join(argv))
        cio.err.print(f"[red]error:[/red] {escape(f'{type(exc).__name__}: {exc}')}")
        return 1
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


# -- forwarding to a running `meterline up` ------------------------------------------------------------


def _arg_text(value: Any) -> str:
    if isinstance(value, Path):
        return os.path.abspath(value)  # the service does not share the caller's working directory
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def argv_from_params(ctx: Any, *, skip: Sequence[str] = ()) -> list[str]:
    """The command line that reproduces ``ctx``'s parsed parameters (options, then ``--`` and the
    arguments). Every parameter is spelled out, defaults included, so the receiving side runs with
    exactly what was parsed here; an option whose value is None (not given) is left out, paths are
    made absolute, and the parameters named in ``skip`` are left out."""
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name is None or name in skip or name not in ctx.params:
            continue
        value = ctx.params[name]
        if param.param_type_name == "argument":
            values = value if isinstance(value, (list, tuple)) else [value]
            arguments.extend(_arg_text(v) for v in values if v is not None)
            continue
        if getattr(param, "is_flag", False) and not getattr(param, "multiple", False):
            if param.secondary_opts:
                options.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                options.append(param.opts[0])
            continue
        if value is None:
            continue
        opt = param.opts[0]
        if getattr(param, "multiple", False):
            for item in value:
                options.extend([opt, *(_arg_text(v) for v in (item if isinstance(item, tuple) else (item,)))])
        elif isinstance(value, tuple):
            options.extend([opt, *(_arg_text(v) for v in value)])
        else:
            options.extend([opt, _arg_text(value)])
    return options + (["--", *arguments] if arguments else [])


def forward_to_up(ctx: Any, *path: str, keep_local: Sequence[str] = ()) -> CapturedRun | None:
    """Run this command in the ``meterline up`` of this data_dir when one runs and ClickHouse is the
    embedded engine (which ``up`` owns); return what it printed. None: run it here (a server DSN,
    no running ``up``, invalid settings — reported by the local path —, or already inside ``up``).
    Parameters named in ``keep_local`` are not sent (the caller handles them)."""
    if _IO.get() is not None:
        return None
    try:
        settings = Settings()
    except Exception:
        return None
    if urlparse(settings.resolved_clickhouse_dsn).scheme != "chdb":
        return None
    api = running_api(settings.data_dir)
    if api is None:
        return None
    argv = [*path, *argv_from_params(ctx, skip=keep_local)]
    cio = current_io()
    cio.err.print(
        f"[dim]meterline up is running ({api[0]}) and owns the embedded ClickHouse engine: "
        f"running `meterline {' '.join(path)}` there, with its settings[/dim]",
        soft_wrap=True,
    )
    try:
        return post_run(
            api, argv, width=cio.out.width, color=cio.out.is_terminal and cio.err.is_terminal and not cio.out.no_color
        )
    except MeterlineError as exc:
        raise fail(exc) from exc


def post_run(api: tuple[str, str], argv: list[str], *, width: int, color: bool) -> CapturedRun:
    import httpx

    from meterline.shell.api.client import call_json

    body = {"argv": argv, "width": max(20, min(1000, width)), "color": color}
    # no read timeout: a sync may take minutes; the service answers when the command is done
    status, doc = call_json(*api, "POST", "/v1/admin/run", body, timeout=httpx.Timeout(30.0, read=None))
    if status >= 400 or "exit_code" not in doc:
        e = doc.get("error", {})
        hint = " (is the running meterline up older than this CLI? restart it)" if status == 404 else ""
        raise MeterlineError(
            f"meterline up did not run the command: HTTP {status} {e.get('code')}: {e.get('message')}{hint}"
        )
    return CapturedRun(int(doc["exit_code"]), str(doc.get("stdout", "")), str(doc.get("stderr", "")))


def relay(run: CapturedRun) -> NoReturn:
    """Print what the service's run printed, to the matching streams, and exit with its code."""
    cio = current_io()
    cio.out.file.write(run.stdout)
    cio.out.file.flush()
    cio.err.file.write(run.stderr)
    cio.err.file.flush()
    raise typer.Exit(run.exit_code)


def run_in_up_if_running(ctx: Any, *path: str) -> None:
    """Forward to the running ``meterline up`` (then exit with its code) or return to run here."""
    remote = forward_to_up(ctx, *path)
    if remote is not None:
        relay(remote)
