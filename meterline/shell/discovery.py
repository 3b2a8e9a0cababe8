"""How a command finds the running ``meterline up`` of its data_dir: one file, one reader.

``meterline up`` writes ``<data_dir>/runtime.json`` once its API listens: its pid, the Kafka
bootstrap and topic prefix it runs with, the API's URL, and where its metrics are scraped. The file is written atomically and is
private to the user (0600: docs/security.md). A reader ignores a file whose process is gone, so a
crashed ``up`` never sends a command into the void. The admin key is not in this file: it stays in
``<data_dir>/admin.key`` (0600), which :func:`running_api` reads beside it.

Every command that may talk to a running ``up`` (``meterline sql``, ``produce``, ``credits``,
``stripe``, ``statement``) goes through this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterline.core.config import Settings
from meterline.core.errors import MeterlineError

__all__ = [
    "RUNTIME_FILE",
    "RuntimeInfo",
    "kafka_bootstrap",
    "read_runtime_info",
    "remove_runtime_info",
    "running_api",
    "write_runtime_info",
]

RUNTIME_FILE = "runtime.json"
ADMIN_KEY_FILE = "admin.key"


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    pid: int
    kafka_bootstrap: str | None
    topic_prefix: str
    api_url: str | None
    metrics_url: str | None = None  # the API's /metrics
    worker_metrics_dir: str | None = None  # where each faust worker advertises its /metrics address


def write_runtime_info(data_dir: Path, info: RuntimeInfo) -> Path:
    """Write ``<data_dir>/runtime.json`` atomically (a private temporary file, then a rename)."""
    path = Path(data_dir) / RUNTIME_FILE
    tmp = path.with_name(f".{RUNTIME_FILE}.{os.getpid()}.tmp")
    doc: dict[str, Any] = {
        "pid": info.pid,
        "kafka_bootstrap": info.kafka_bootstrap,
        "topic_prefix": info.topic_prefix,
        "api_url": info.api_url,
        "metrics_url": info.metrics_url,
        "worker_metrics_dir": info.worker_metrics_dir,
    }
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(doc).encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_runtime_info(data_dir: Path) -> RuntimeInfo | None:
    """The running ``meterline up`` of ``data_dir``, or None (no file, unreadable, process gone)."""
    try:
        doc = json.loads((Path(data_dir) / RUNTIME_FILE).read_text(encoding="utf-8"))
        info = RuntimeInfo(
            pid=int(doc["pid"]),
            kafka_bootstrap=doc.get("kafka_bootstrap") or None,
            topic_prefix=str(doc.get("topic_prefix") or ""),
            api_url=doc.get("api_url") or None,
            metrics_url=doc.get("metrics_url") or None,
            worker_metrics_dir=doc.get("worker_metrics_dir") or None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by someone else
    return info


def remove_runtime_info(data_dir: Path, *, only_if_pid: int | None = None) -> None:
    """Delete ``runtime.json``; with ``only_if_pid``, only when that process wrote it."""
    path = Path(data_dir) / RUNTIME_FILE
    if only_if_pid is not None:
        try:
            if int(json.loads(path.read_text(encoding="utf-8"))["pid"]) != only_if_pid:
                return
        except (OSError, ValueError, KeyError, TypeError):
            return
    path.unlink(missing_ok=True)


def running_api(data_dir: Path) -> tuple[str, str] | None:
    """``(api_url, admin_key)`` of a running ``meterline up`` for ``data_dir``, else None."""
    info = read_runtime_info(data_dir)
    key_file = Path(data_dir) / ADMIN_KEY_FILE
    if info is None or not info.api_url or not key_file.exists():
        return None
    return info.api_url, key_file.read_text(encoding="utf-8").strip()


def kafka_bootstrap(settings: Settings) -> tuple[str, str]:
    """The Kafka bootstrap and topic prefix: configured, or those of a running ``meterline up``.

    Raises MeterlineError when there is neither.
    """
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap, settings.topic_prefix
    info = read_runtime_info(settings.data_dir)
    if info is not None and info.kafka_bootstrap:
        return info.kafka_bootstrap, info.topic_prefix or settings.topic_prefix
    raise MeterlineError("no Kafka broker: start `meterline up` (embedded broker) or set METERLINE_KAFKA_BOOTSTRAP")
