"""Run the API app with uvicorn in a background thread, and let CLI commands find it.

:class:`ApiServer` binds the socket itself (so ``port=0`` picks a free port and :attr:`url` is
known before serving), runs ``uvicorn.Server`` in a daemon thread, and ``start()`` returns only
once uvicorn reports it is accepting connections (or raises ConfigError if it failed to start).
``stop()`` asks uvicorn to exit, waits for in-flight requests, and joins the thread.

Discovery: ``data_dir/api.json`` = ``{"url", "pid", "admin_key"?}`` (mode 0600, written atomically)
tells ``meterline sql`` / ``meterline produce`` where a running service listens. ``ApiServer``
writes it on start and removes it on stop when given ``discovery_dir``; :func:`read_discovery`
ignores a file whose pid is not alive (a crashed service).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from meterline.errors import ConfigError

__all__ = ["DISCOVERY_FILENAME", "ApiServer", "Discovery", "read_discovery", "remove_discovery", "write_discovery"]

log = logging.getLogger(__name__)

DISCOVERY_FILENAME = "api.json"


class ApiServer:
    """uvicorn in a background thread. ``ApiServer(app, "127.0.0.1", 0).start().url``."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        discovery_dir: Path | None = None,
        discovery_admin_key: str | None = None,
        access_log: bool = False,
        log_level: str = "warning",
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._discovery_dir = discovery_dir
        self._discovery_admin_key = discovery_admin_key
        self._config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", access_log=access_log, log_level=log_level,
            log_config=None,
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> ApiServer:
        if self._thread is not None:
            raise RuntimeError("ApiServer already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says TCP. Without it every kept-alive response after the first waited
        # ~40 ms (Nagle on uvicorn's two writes, headers and body, against the client's delayed ACK).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        sock.listen(128)
        sock.set_inheritable(True)
        self._sock = sock
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(self._config)
        self._server = server

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"meterline-api-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"API server on {self.url} did not start: {self._error!r}")
            time.sleep(0.01)
        if self._discovery_dir is not None:
            write_discovery(self._discovery_dir, self.url, self._discovery_admin_key)
        log.info("API listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (idempotent): finish in-flight requests, close the socket, drop api.json."""
        if self._discovery_dir is not None:
            remove_discovery(self._discovery_dir, only_if_pid=os.getpid())
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------- discovery


@dataclass(frozen=True, slots=True)
class Discovery:
    url: str
    pid: int
    admin_key: str | None = None


def write_discovery(data_dir: Path, url: str, admin_key: str | None = None) -> Path:
    """Write ``data_dir/api.json`` atomically with mode 0600 (it may hold an admin key)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"url": url, "pid": os.getpid()}
    if admin_key is not None:
        doc["admin_key"] = admin_key
    path = data_dir / DISCOVERY_FILENAME
    fd, tmp = tempfile.mkstemp(prefix=".api.", suffix=".tmp", dir=data_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            json.dump(doc, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_discovery(data_dir: Path) -> Discovery | None:
    """The running service's address, or None (no file, unreadable, or its process is gone)."""
    try:
        doc = json.loads((Path(data_dir) / DISCOVERY_FILENAME).read_text(encoding="utf-8"))
        info = Discovery(url=str(doc["url"]), pid=int(doc["pid"]), admin_key=doc.get("admin_key"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by someone else
    return info


def remove_discovery(data_dir: Path, *, only_if_pid: int | None = None) -> None:
    """Delete ``api.json``; with ``only_if_pid``, only when that process wrote it."""
    path = Path(data_dir) / DISCOVERY_FILENAME
    if only_if_pid is not None:
        try:
            if int(json.loads(path.read_text(encoding="utf-8"))["pid"]) != only_if_pid:
                return
        except (OSError, ValueError, KeyError, TypeError):
            return
    path.unlink(missing_ok=True)
