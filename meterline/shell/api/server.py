"""Run the API app with uvicorn in a background thread.

:class:`ApiServer` binds the socket itself (so ``port=0`` picks a free port and :attr:`url` is
known before serving), runs ``uvicorn.Server`` in a daemon thread, and ``start()`` returns only
once uvicorn reports it is accepting connections (or raises ConfigError if it failed to start).
``stop()`` asks uvicorn to exit, waits for in-flight requests, and joins the thread.

How CLI commands find a running service: :mod:`meterline.shell.discovery` (``runtime.json``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from meterline.core.errors import ConfigError

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)


class ApiServer:
    """uvicorn in a background thread. ``ApiServer(app, "127.0.0.1", 0).start().url``."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        access_log: bool = False,
        log_level: str = "warning",
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=access_log,
            log_level=log_level,
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
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"meterline-api-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"API server on {self.url} did not start: {self._error!r}")
            time.sleep(0.01)
        log.info("API listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (idempotent): finish in-flight requests, close the socket."""
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
