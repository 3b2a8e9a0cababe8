"""The API server's sockets: responses on a kept-alive connection must not wait for Nagle."""

from __future__ import annotations

import http.client
import socket

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meterline.shell.api.server import ApiServer


async def _ok(_: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def test_accepted_connections_have_tcp_nodelay() -> None:
    # uvicorn writes a response as two segments (headers, body). With Nagle on, the second waits
    # for the client's delayed ACK: ~40 ms on every kept-alive request after the first.
    server = ApiServer(Starlette(routes=[Route("/x", _ok)])).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for _ in range(3):  # the same kept-alive connection
            conn.request("GET", "/x")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b'{"ok":true}'
        state = server._server.server_state  # type: ignore[union-attr]
        sockets = [c.transport.get_extra_info("socket") for c in state.connections]
        assert len(sockets) == 1
        assert sockets[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        conn.close()
    finally:
        server.stop()
