"""Run operator commands inside the running ``meterline up``: ``POST /v1/admin/run``.

Why: with the embedded ClickHouse engine (``chdb://``, the default) only ONE process may open the
engine path, and while ``meterline up`` runs that process is ``up``. ``meterline stripe
provision|sync|grants|reconcile``, ``meterline statement`` and ``meterline reprice`` read and write
ClickHouse, so when
they are started from another shell they send their argv here and run in ``up`` instead (the same
typer command code, with its output captured). With a ClickHouse server DSN they run locally.

Route
-----
``POST /v1/admin/run``  admin key (customer keys: 403). Body (at most 64 KiB)::

    {"argv": ["stripe", "sync", "--now", "1767225600"], "width"?: 120, "color"?: false}

- ``argv[0]`` must be ``stripe`` followed by one of its commands (provision, sync, grants,
  reconcile), ``statement`` or ``reprice`` (every flag; ``--prices FILE`` is read by ``up`` on the
  same machine, sent as an absolute path); anything else is 400 ``command_not_allowed``. ``--help`` is 400
  ``help_not_available`` (run it locally). ``statement --out`` is 400 ``option_not_allowed``:
  nothing run here writes to a path the caller chose; the statement comes back in ``stdout`` and
  the CLI writes ``--out`` on the caller's machine (the command itself refuses ``--out`` when run
  inside ``up``, exit 2). The customer argument must have the contract's customer-id form. ``width`` is the console width the output is rendered
  for (20–1000, default 100); ``color`` asks for ANSI colours.
- The command runs in a worker thread, never on the event loop, with this service's settings
  (its ClickHouse, its Stripe key or local Stripe server, its Kafka) — not the caller's
  environment. Answer 200 ``{"exit_code": int, "stdout": str, "stderr": str}`` whatever the exit
  code: the command ran, and its exit code says how it went.
- One run at a time (the periodic ``stripe sync`` of ``METERLINE_STRIPE_SYNC_EVERY_S`` shares the
  same slot). A request arriving while another runs waits up to :data:`RUN_WAIT_S` (30 s) for it
  to finish, then gets 409 ``busy`` naming the running command.
- A client that disconnects does not stop a started run: it completes and its output is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from meterline.core.config import Settings
from meterline.core.errors import InputError
from meterline.shell.api.auth import ApiError, require_admin, require_key
from meterline.shell.api.body import json_object

__all__ = ["ALLOWED_COMMANDS", "RUN_WAIT_S", "CommandRunner", "RunResult", "RunnerBusy", "admin_routes"]

log = logging.getLogger(__name__)

ALLOWED_COMMANDS = ("stripe", "statement", "reprice")
RUN_WAIT_S = 30.0
MAX_BODY_BYTES = 64 * 1024
DEFAULT_WIDTH = 100


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: str
    stderr: str
    results: tuple[Any, ...] = ()  # summary objects the command reported (e.g. a SyncSummary)

    def to_dict(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "stdout": self.stdout, "stderr": self.stderr}


class RunCaptured(Protocol):
    """Runs ``meterline <argv>`` in this thread with ``settings``, output captured."""

    def __call__(self, argv: Sequence[str], settings: Settings, *, width: int = ..., color: bool = ...) -> Any: ...


class RunnerBusy(Exception):
    """Another command is running in this process."""

    def __init__(self, running: str, for_s: float) -> None:
        super().__init__(
            f"`meterline {running}` is running in meterline up (for {for_s:.0f} s); retry when it has finished"
        )
        self.running = running
        self.for_s = for_s


class CommandRunner:
    """Runs allow-listed ``meterline`` commands in this process, one at a time, with ``settings``.

    ``run`` runs one command line with output captured (``meterline.shell.cli_stripe.run_captured``) and
    ``stripe_commands`` names the ``meterline stripe`` subcommands that may run; both are given by
    whoever assembles the service (``meterline up``), so the API does not import the CLI.
    """

    def __init__(
        self, settings: Settings, *, run: RunCaptured, stripe_commands: Sequence[str], wait_s: float = RUN_WAIT_S
    ) -> None:
        self.settings = settings
        self._run = run
        self.stripe_commands = sorted(stripe_commands)
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._running: tuple[str, float] | None = None

    def check(self, argv: Any) -> list[str]:
        """``argv`` as a list of strings if it names an allowed command; InputError otherwise."""
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise InputError("'argv' must be a non-empty array of strings", reason_code="invalid_body", field="argv")
        if argv[0] not in ALLOWED_COMMANDS:
            raise InputError(
                f"only {', '.join(repr(c) for c in ALLOWED_COMMANDS[:-1])} and {ALLOWED_COMMANDS[-1]!r} commands "
                f"run through the API, not {argv[0]!r}",
                reason_code="command_not_allowed",
                field="argv",
            )
        if argv[0] == "stripe":
            names = self.stripe_commands
            if len(argv) < 2 or argv[1] not in names:
                raise InputError(
                    f"'stripe' needs one of its commands: {', '.join(names)}",
                    reason_code="command_not_allowed",
                    field="argv",
                )
        options = argv[: argv.index("--")] if "--" in argv else argv
        if argv[0] == "statement" and any(a == "--out" or a.startswith("--out=") for a in options):
            raise InputError(
                "--out would write a file on the server: the statement is returned in 'stdout' "
                "(the meterline CLI writes --out on the caller's side)",
                reason_code="option_not_allowed",
                field="argv",
            )
        if "--help" in options:
            raise InputError(
                "--help is not available through the API: run it locally",
                reason_code="help_not_available",
                field="argv",
            )
        return list(argv)

    @property
    def running(self) -> tuple[str, float] | None:
        """``(command line, seconds running)`` of the current run, if any."""
        current = self._running
        return None if current is None else (current[0], time.monotonic() - current[1])

    def run(
        self, argv: Sequence[str], *, wait_s: float | None = None, width: int = DEFAULT_WIDTH, color: bool = False
    ) -> RunResult:
        """Run ``meterline <argv>`` here and return its exit code and captured output.

        Waits up to ``wait_s`` (default :attr:`wait_s`) for a run in progress; raises RunnerBusy
        after that, InputError for a command that is not allowed.
        """
        args = self.check(list(argv))
        if not self._lock.acquire(timeout=self.wait_s if wait_s is None else wait_s):
            running = self.running
            raise RunnerBusy(*(running or ("another command", 0.0)))
        line = " ".join(args)
        self._running = (line, time.monotonic())
        try:
            captured = self._run(args, self.settings, width=width, color=color)
        finally:
            self._running = None
            self._lock.release()
        return RunResult(captured.exit_code, captured.stdout, captured.stderr, captured.results)


async def _json_body(request: Request) -> dict[str, Any]:
    return await json_object(request, MAX_BODY_BYTES, '{"argv": [...]}')


def admin_routes(runner: CommandRunner) -> list[BaseRoute]:
    """``POST /v1/admin/run`` over ``runner`` (see the module docstring)."""

    async def run(request: Request) -> Response:
        key = require_key(request)
        require_admin(key)
        doc = await _json_body(request)
        try:
            argv = runner.check(doc.get("argv"))
        except InputError as exc:
            raise ApiError(400, exc.reason_code, exc.message, field=exc.field) from None
        width = doc.get("width", DEFAULT_WIDTH)
        if isinstance(width, bool) or not isinstance(width, int) or not 20 <= width <= 1000:
            raise ApiError(400, "invalid_body", "'width' must be an integer from 20 to 1000", field="width")
        color = doc.get("color", False)
        if not isinstance(color, bool):
            raise ApiError(400, "invalid_body", "'color' must be true or false", field="color")
        log.info("admin run by key_id=%s: meterline %s", key.key_id, " ".join(argv))
        try:
            result = await run_in_threadpool(runner.run, argv, width=width, color=color)
        except RunnerBusy as exc:
            raise ApiError(409, "busy", str(exc), headers={"Retry-After": "5"}) from None
        log.info("admin run by key_id=%s: meterline %s exited %d", key.key_id, argv[0], result.exit_code)
        return JSONResponse(result.to_dict())

    return [Route("/v1/admin/run", run, methods=["POST"])]
