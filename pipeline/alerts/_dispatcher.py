"""``WebhookDispatcher``: the ``alerts`` topic → signed HTTP POSTs to every configured webhook URL.

Processing contract, per alert record (one thread, records in partition order):

1. Decode the JSON value. A value that is not a JSON object with a string ``alert_id`` cannot be
   delivered: it is logged (error) and its offset committed. An ``alert_id`` that is not
   header-safe (1-512 visible ASCII characters: no CR/LF, controls, spaces or non-ASCII) could
   never be sent either: it is recorded ``dead`` for every URL at once and never retried, so one
   bad alert cannot hold up the ones behind it (likewise a request the HTTP client refuses to
   build, ``httpx.LocalProtocolError``).
2. For each URL: skip it when the delivered-store already has an outcome for ``(alert_id, url)``
   (a replayed or re-read alert is delivered once). Otherwise POST the body with a fresh
   ``Meterline-Signature`` per attempt; any 2xx is success → record ``delivered``. Anything else
   (connection refused, timeout, non-2xx) is retried with capped exponential backoff
   (``backoff_base_s`` × 2^n, at most ``backoff_cap_s``) until the alert is older than
   ``max_age_s`` (default 3 days, counted from the alert's ``at_ms``, else the record timestamp);
   then it is recorded ``dead`` and logged at error level.
3. Only when every URL has an outcome is the record's offset committed (synchronously). A crash
   before that re-reads the record; URLs already recorded are skipped, so only a crash between a
   2xx and its record repeats a delivery (receivers dedupe on ``Meterline-Alert-Id``).

While one alert is being retried the dispatcher does not move on (alerts stay in order, and the
receiver is down for all of them anyway). ``max.poll.interval.ms`` is raised to its maximum (1 day);
a longer outage makes the consumer leave and rejoin its group, which re-reads the uncommitted
alert, and the store keeps that from being delivered twice. Run one dispatcher per store.

The signing secret is never logged; URLs are logged without user-info or query string.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

import meterline
from meterline.core.errors import ConfigError
from meterline.stack.metrics import ALERT_DELIVERIES
from pipeline.alerts._signing import ALERT_ID_HEADER, SIGNATURE_HEADER, sign
from pipeline.alerts._store import DeliveredStore

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_S = 3 * 86_400
DEFAULT_KEEP_OUTCOMES_S = 31 * 86_400  # the alerts topic keeps 30 days (infra/topics.yaml); one day more
PRUNE_EVERY_S = 3600.0
# An alert id is sent as the Meterline-Alert-Id header: visible ASCII only, bounded.
_HEADER_SAFE_ID = re.compile(r"[\x21-\x7e]{1,512}")


def _safe_url(url: str) -> str:
    p = urlsplit(url)
    host = p.hostname or ""
    return f"{p.scheme}://{host}{':' + str(p.port) if p.port else ''}{p.path}"


class WebhookDispatcher:
    """Consumes ``topic`` in consumer group ``group_id`` and delivers each alert to every URL."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        *,
        urls: Sequence[str],
        secret: str | SecretStr,
        store_path: Path,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 300.0,
        http_timeout_s: float = 10.0,
        consumer_config: dict[str, Any] | None = None,
        keep_outcomes_s: float = DEFAULT_KEEP_OUTCOMES_S,
    ) -> None:
        if not urls:
            raise ConfigError("WebhookDispatcher needs at least one webhook URL")
        for u in urls:
            if urlsplit(u).scheme not in ("http", "https") or not urlsplit(u).hostname:
                raise ConfigError(f"webhook URL must be http(s)://host/...: {_safe_url(u)!r}")
        secret_value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        if not secret_value:
            raise ConfigError("WebhookDispatcher needs a non-empty signing secret")
        self._secret = SecretStr(secret_value)
        self.bootstrap = bootstrap
        self.topic = topic
        self.group_id = group_id
        self.urls = list(urls)
        self.store = DeliveredStore(store_path)
        self.keep_outcomes_s = keep_outcomes_s
        self._next_prune = 0.0
        self.max_age_s = max_age_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self._http = httpx.Client(
            timeout=http_timeout_s,
            follow_redirects=False,
            headers={"User-Agent": f"meterline-webhooks/{meterline.__version__}"},
        )
        self._consumer_config = dict(consumer_config or {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0  # counters for health / tests
        self.dead = 0

    def __repr__(self) -> str:  # no secret
        return f"WebhookDispatcher(topic={self.topic!r}, urls={[_safe_url(u) for u in self.urls]!r})"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> WebhookDispatcher:
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="meterline-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._http.close()
        self.store.close()

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set (also what :meth:`start` runs in its thread)."""
        from confluent_kafka import Consumer

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
                "max.poll.interval.ms": 86_400_000,
                "log_level": 3,
                **self._consumer_config,
            }
        )
        consumer.subscribe([self.topic])
        try:
            while not stop.is_set():
                self._maybe_prune()
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                if msg.error() is not None:
                    log.warning("alerts: consumer error: %s", msg.error())
                    continue
                if not self._handle(msg, stop):
                    return  # stopping mid-retry: leave the offset uncommitted
                try:
                    consumer.commit(message=msg, asynchronous=False)
                except Exception as exc:
                    log.warning(
                        "alerts: commit of %s[%d]@%d failed: %s", msg.topic(), msg.partition(), msg.offset(), exc
                    )
        finally:
            consumer.close()

    def _maybe_prune(self) -> None:
        """Forget delivery outcomes older than ``keep_outcomes_s``, at most once an hour.

        The store only needs an outcome while its alert can still be re-read from the topic, so
        ``keep_outcomes_s`` defaults to the alerts topic's retention plus a day; without pruning the
        file would grow forever."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_S
        pruned = self.store.prune(int(self.keep_outcomes_s))
        if pruned:
            log.info("alerts: forgot %d delivery outcomes older than %.0f days", pruned, self.keep_outcomes_s / 86400)

    # -- one alert -------------------------------------------------------------------------------

    def _handle(self, msg: Any, stop: threading.Event) -> bool:
        """Deliver one record to every URL; False only when stopped before it was settled."""
        try:
            alert = json.loads(msg.value() or b"")
        except (ValueError, UnicodeDecodeError):
            alert = None
        if not isinstance(alert, dict) or not isinstance(alert.get("alert_id"), str) or not alert["alert_id"]:
            log.error(
                "alerts: skipping undeliverable record %s[%d]@%d (not a JSON alert with alert_id)",
                msg.topic(),
                msg.partition(),
                msg.offset(),
            )
            return True
        alert_id = alert["alert_id"]
        if not _HEADER_SAFE_ID.fullmatch(alert_id):
            # It could never be sent (the id travels in a header: CR/LF, controls, non-ASCII are
            # refused by the HTTP client); retrying it for max_age_s would hold up every alert
            # behind it. Settle it as dead for every URL, with a log line that cannot inject.
            for url in self.urls:
                if self.store.outcome(alert_id, url) is None:
                    self.store.record(alert_id, url, "dead", 0)
                    self.dead += 1
            log.error(
                "alerts: refusing alert %s[%d]@%d: alert_id %r is not a header-safe id",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                alert_id[:200],
            )
            return True
        at_ms = alert.get("at_ms")
        if not isinstance(at_ms, int) or isinstance(at_ms, bool):
            _kind, at_ms = msg.timestamp()
        body = json.dumps(alert, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
        for url in self.urls:
            if self.store.outcome(alert_id, url) is not None:
                continue
            if not self._deliver(url, alert_id, body, int(at_ms), stop):
                return False
        return True

    def _deliver(self, url: str, alert_id: str, body: bytes, at_ms: int, stop: threading.Event) -> bool:
        attempt = 0
        while True:
            attempt += 1
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(self._secret, body),
                ALERT_ID_HEADER: alert_id,
            }
            try:
                resp = self._http.post(url, content=body, headers=headers)
                problem = None if 200 <= resp.status_code < 300 else f"HTTP {resp.status_code}"
            except httpx.LocalProtocolError as exc:  # this request can never be sent: do not retry it
                self.store.record(alert_id, url, "dead", attempt)
                self.dead += 1
                log.error(
                    "alerts: alert_id=%r to %s cannot be sent (%s); giving up",
                    alert_id[:200],
                    _safe_url(url),
                    type(exc).__name__,
                )
                return True
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            if problem is None:
                self.store.record(alert_id, url, "delivered", attempt)
                self.delivered += 1
                ALERT_DELIVERIES.labels("delivered").inc()
                log.info("alerts: delivered alert_id=%s to %s (attempt %d)", alert_id, _safe_url(url), attempt)
                return True
            age_s = time.time() - at_ms / 1000
            if age_s > self.max_age_s:
                self.store.record(alert_id, url, "dead", attempt)
                self.dead += 1
                ALERT_DELIVERIES.labels("dead").inc()
                log.error(
                    "alerts: giving up alert_id=%s to %s after %d attempts (%s; alert %.0fs old)",
                    alert_id,
                    _safe_url(url),
                    attempt,
                    problem,
                    age_s,
                )
                return True
            delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(attempt - 1, 30))
            ALERT_DELIVERIES.labels("retry").inc()
            log.warning(
                "alerts: alert_id=%s to %s failed (%s), attempt %d; retrying in %.2fs",
                alert_id,
                _safe_url(url),
                problem,
                attempt,
                delay,
            )
            if stop.wait(delay):
                return False
