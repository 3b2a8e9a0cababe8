"""Run faust workers (``python -m pipeline.worker``) as supervised child processes.

Each worker gets the settings through ``METERLINE_*`` environment variables, writes its log to a
file, and dies with the process that started it (Linux ``PR_SET_PDEATHSIG``), so a killed
``meterline up`` leaves no orphan worker behind. Tests use :meth:`WorkerProcess.kill` (SIGKILL)
to prove that a crash at any moment only delays the totals.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from meterline.core.config import Settings
from meterline.stack.broker import die_with_parent_preexec


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``METERLINE_*`` variables that reproduce ``settings`` in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        # pydantic-settings reads complex fields (lists, dicts) from the environment as JSON.
        env[f"METERLINE_{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return env


class WorkerProcess:
    def __init__(self, settings: Settings, *, name: str, log_dir: Path, module: str = "pipeline.worker") -> None:
        self.settings = settings
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Settings come only from ``self.settings``; METERLINE_WORKER_* (log level, profiling) pass through.
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("METERLINE_") or k.startswith("METERLINE_WORKER_")
        }
        env.update(settings_env(self.settings))
        env["METERLINE_WORKER_NAME"] = self.name  # names its metrics listener's advert (meterline.stack.metrics)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches us only; we stop the workers in order
                preexec_fn=die_with_parent_preexec(),
                close_fds=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash the invariant tests inflict."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (faust shuts down and commits), then SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, max_bytes: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        return data[-max_bytes:].decode("utf-8", "replace")
