"""``meterline proxy --upstream URL``: run the OpenAI-compatible metering proxy (see
:mod:`meterline.shell.proxy`). It needs the meterline API (a running ``meterline up`` for this data_dir,
or ``--api-url``) and the key file of the same data_dir (customers authenticate with their
meterline customer key)."""

from __future__ import annotations

import os
import signal
import threading

import typer
from rich.console import Console

from meterline.core.config import Settings
from meterline.core.errors import MeterlineError

__all__ = ["proxy_command"]

_err = Console(stderr=True)


def proxy_command(
    upstream: str = typer.Option(
        ..., "--upstream", help="OpenAI-compatible base URL to forward to, e.g. https://api.openai.com/v1."
    ),
    api_url: str | None = typer.Option(
        None, "--api-url", help="meterline API base URL (default: the running `meterline up`)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8788, "--port", help="Port to listen on (0 = any free port)."),
    provider: str = typer.Option("openai", "--provider", help="Provider the upstream bills as (price lookup)."),
    upstream_key_env: str = typer.Option(
        "OPENAI_API_KEY", "--upstream-key-env", help="Environment variable holding the upstream API key."
    ),
    max_output_tokens: int = typer.Option(
        4096, "--max-output-tokens", help="Output tokens reserved when a request sets no max_tokens."
    ),
) -> None:
    """Meter OpenAI-compatible traffic: authorize, forward (streaming too), meter the upstream's usage, settle."""
    from meterline.shell.api.keys import KeyStore
    from meterline.shell.api.server import ApiServer
    from meterline.shell.discovery import read_runtime_info
    from meterline.shell.proxy import create_proxy_app

    settings = Settings()
    if api_url is None:
        info = read_runtime_info(settings.data_dir)
        api_url = info.api_url if info is not None else None
    if not api_url:
        _err.print("[red]no meterline API: start `meterline up` for this data_dir or pass --api-url[/red]")
        raise typer.Exit(2)
    app = create_proxy_app(
        upstream=upstream,
        api_url=api_url,
        keys=KeyStore.for_data_dir(settings.data_dir),
        upstream_key=os.environ.get(upstream_key_env),
        provider=provider,
        default_max_output_tokens=max_output_tokens,
    )
    try:
        server = ApiServer(app, host, port).start()
    except MeterlineError as exc:
        _err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    print(f"meterline proxy listening on {server.url}/v1 -> {upstream} (meterline API {api_url})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
