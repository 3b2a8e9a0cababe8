"""The Kafka side of the credits API: publish ledger commands, wait for authorize replies, and keep
a local view of the compacted ``customer-status`` topic. Message formats: the credits contract
(``ledger-commands`` / ``ledger-replies`` / ``customer-status``, JSON UTF-8).

Contracts
---------
:class:`CommandPublisher` ``send(command)`` returns only once the broker acknowledged the record
(idempotent producer, ``acks=all``, murmur2 partitioner so the record lands on the partition faust
routes ``customer_id`` to); otherwise it raises :class:`~meterline.core.errors.DeliveryFailed`. A
command that timed out may still arrive later: commands carry a deterministic ``command_id`` and
the credit agent applies each id once, so re-sending is safe.

:class:`ReplyWaiter` reads every partition of ``ledger-replies`` from where it ended when the
waiter started (no consumer group). Register interest *before* publishing (:meth:`ReplyWaiter.register`),
then wait on the returned future. Replies are matched on ``(customer_id, request_id)``, never on
the client-chosen ``request_id`` alone (docs/security.md). Replies nobody waits for are kept in a
bounded recent cache, so a retry with the same ``request_id`` finds the answer the agent already
gave that customer.

:class:`StatusView` reads ``customer-status`` from the beginning and keeps the last value per key
(a null value deletes the key, as compaction would). It is *ready* once every partition reported
EOF and then ``quiet_s`` more passed while it kept reading: the broker's high watermark is not
trusted (Tansu reports the last batch's base offset + 1, see shared/notes/broker.md), so EOF alone
may fire before the tail of the last batch was read. Readiness does not wait for the topic to go
idle, so it is reached under constant traffic too.

Command builders (``*_command``) validate operator input (amounts parsed exactly with
:func:`meterline.core.ledger.parse_amount`) and raise :class:`~meterline.core.errors.InputError` with
``field``; the HTTP routes and the CLI share them.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError
from datetime import datetime
from typing import Any

from meterline.core.errors import BrokerUnavailable, DeliveryFailed, InputError
from meterline.core.ledger import LedgerCommandError, format_picos, parse_amount, to_ms
from schemas.credits import decode_json, encode_message
from schemas.models import CUSTOMER_ID_RULE, is_customer_id

__all__ = [
    "CommandPublisher",
    "ReplyWaiter",
    "StatusView",
    "adjust_command",
    "authorize_command",
    "balance_summary",
    "block_command",
    "budget_command",
    "grant_command",
    "now_ms",
    "parse_instant_ms",
    "policy_command",
    "status_summary",
    "void_command",
]

log = logging.getLogger(__name__)

_TIMEOUTS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}  # broker.md §3


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _decode(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        return decode_json(value)
    except InputError:
        return None


# ------------------------------------------------------------------------------- publisher


class CommandPublisher:
    """Publishes ledger commands (JSON, key ``customer_id``) and waits for each acknowledgement."""

    def __init__(
        self, bootstrap: str, topic: str, *, ack_timeout_s: float = 10.0, config: dict[str, Any] | None = None
    ) -> None:
        from meterline.stack.kafka import make_producer

        self.topic = topic
        self.ack_timeout_s = ack_timeout_s
        self._producer = make_producer(bootstrap, {"linger.ms": 1, **(config or {})})
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="meterline-commands-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    def send(self, command: dict[str, Any], *, timeout_s: float | None = None) -> None:
        """Produce ``command`` and block until the broker acknowledged it (DeliveryFailed otherwise)."""
        for field in ("type", "command_id", "customer_id", "at_ms"):
            if field not in command:
                raise InputError(f"a ledger command needs {field!r}", reason_code="invalid_command", field=field)
        customer_id = str(command["customer_id"])
        done = threading.Event()
        errors: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            done.set()

        body = encode_message(command)
        timeout = self.ack_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._producer.produce(self.topic, key=customer_id.encode("utf-8"), value=body, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let the poller drain it
                if time.monotonic() > deadline:
                    raise DeliveryFailed("producer queue full", topic=self.topic) from None
                time.sleep(0.01)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise DeliveryFailed(
                f"command {command['command_id']} not acknowledged within {timeout:g}s",
                topic=self.topic,
                key=customer_id.encode("utf-8"),
            )
        if errors:
            raise DeliveryFailed(
                f"command {command['command_id']} not delivered: {errors[0]}",
                topic=self.topic,
                key=customer_id.encode("utf-8"),
            )

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout_s``), then destroy the librdkafka client, so it
        does not reconnect (and log ``Connection refused``) after the broker stops. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._poller.join(timeout_s)
        if self._producer.flush(timeout_s) > 0:
            self._producer.purge()  # unacknowledged: their senders already got DeliveryFailed
        self._producer.close()


# ------------------------------------------------------------------------------- consumers


class _ConsumerThread:
    """A confluent-kafka consumer driven by one daemon thread; subclasses handle each message."""

    def __init__(self, bootstrap: str, topic: str, name: str, config: dict[str, Any]) -> None:
        from confluent_kafka import Consumer

        self.topic = topic
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"meterline-{name}-{uuid.uuid4().hex[:12]}",  # never joined: assign() only
                "enable.auto.commit": False,
                "log_level": 3,
                # Replies and statuses are on the request path: don't let an idle fetch sit on the
                # broker for librdkafka's default 500 ms (the dev broker does not wake a waiting fetch
                # when data arrives; real Kafka does, so this only costs a few idle fetches there).
                "fetch.wait.max.ms": 10,
                **_TIMEOUTS,
                **config,
            }
        )
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"meterline-{name}", daemon=True)

    def _partitions(self, timeout_s: float) -> list[int]:
        try:
            md = self._consumer.list_topics(self.topic, timeout=timeout_s)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot read metadata of {self.topic}: {exc}") from exc
        t = md.topics.get(self.topic)
        if t is None or t.error is not None or not t.partitions:
            raise BrokerUnavailable(f"topic {self.topic} does not exist")
        return sorted(t.partitions)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._consumer.poll(0.1)
            except Exception as exc:
                log.warning("%s: poll failed: %s", self.topic, exc)
                time.sleep(0.5)
                continue
            self._on_message(msg)
        self._consumer.close()

    def _on_message(self, msg: Any) -> None:
        raise NotImplementedError

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and close the consumer (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        elif self._thread.ident is None and not self._closed:
            self._consumer.close()  # never started
        self._closed = True


ReplyKey = tuple[str, str]  # (customer_id, request_id)


class ReplyWaiter(_ConsumerThread):
    """Futures of ``ledger-replies`` keyed by ``(customer_id, request_id)``.

    Request ids are chosen by clients, so two customers may use the same one (by accident, or to
    steer the other's decision): a reply is only ever handed to a waiter, or kept in the recent
    cache, under the customer it names. A reply without a string ``customer_id`` is dropped.

    ``start()`` assigns every partition at its current end (an end reported too early by the broker
    only means a few old replies are read again, which is harmless).
    """

    def __init__(
        self, bootstrap: str, topic: str, *, recent_max: int = 10_000, config: dict[str, Any] | None = None
    ) -> None:
        super().__init__(bootstrap, topic, "replies", dict(config or {}))
        self._lock = threading.Lock()
        self._waiting: dict[ReplyKey, list[Future[dict[str, Any]]]] = {}
        self._recent: OrderedDict[ReplyKey, dict[str, Any]] = OrderedDict()
        self._recent_max = recent_max

    def start(self, timeout_s: float = 15.0) -> ReplyWaiter:
        from confluent_kafka import TopicPartition

        tps = []
        for p in self._partitions(timeout_s):
            try:
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=timeout_s)
            except Exception as exc:
                raise BrokerUnavailable(f"cannot read offsets of {self.topic}[{p}]: {exc}") from exc
            tps.append(TopicPartition(self.topic, p, max(0, high)))
        self._consumer.assign(tps)
        self._thread.start()
        return self

    def register(self, customer_id: str, request_id: str) -> Future[dict[str, Any]]:
        """A future resolved with ``customer_id``'s reply for ``request_id`` (at once if it already arrived)."""
        key = (customer_id, request_id)
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            known = self._recent.get(key)
            if known is not None:
                fut.set_result(known)
            else:
                self._waiting.setdefault(key, []).append(fut)
        return fut

    def discard(self, customer_id: str, request_id: str, fut: Future[dict[str, Any]]) -> None:
        """Stop waiting with ``fut`` (call it after a timeout so nothing leaks)."""
        key = (customer_id, request_id)
        with self._lock:
            futs = self._waiting.get(key)
            if futs and fut in futs:
                futs.remove(fut)
                if not futs:
                    del self._waiting[key]

    def wait(self, customer_id: str, request_id: str, timeout_s: float) -> dict[str, Any]:
        """Block for the reply; raises TimeoutError. Synchronous callers only (register first!)."""
        fut = self.register(customer_id, request_id)
        try:
            return fut.result(timeout_s)
        finally:
            self.discard(customer_id, request_id, fut)

    def _on_message(self, msg: Any) -> None:
        if msg is None or msg.error() is not None:
            return
        reply = _decode(msg.value())
        if (
            reply is None
            or not isinstance(reply.get("request_id"), str)
            or not isinstance(reply.get("customer_id"), str)
        ):
            log.warning(
                "ledger-replies: ignoring an undecodable reply at %s[%d]@%d", msg.topic(), msg.partition(), msg.offset()
            )
            return
        key = (reply["customer_id"], reply["request_id"])
        with self._lock:
            self._recent[key] = reply
            self._recent.move_to_end(key)
            while len(self._recent) > self._recent_max:
                self._recent.popitem(last=False)
            futs = self._waiting.pop(key, [])
        for fut in futs:
            try:
                fut.set_result(reply)
            except InvalidStateError:  # the waiter gave up (cancelled) meanwhile
                pass


class StatusView(_ConsumerThread):
    """The last ``customer-status`` value per customer, read from the beginning of the topic."""

    def __init__(
        self, bootstrap: str, topic: str, *, quiet_s: float = 0.5, config: dict[str, Any] | None = None
    ) -> None:
        super().__init__(bootstrap, topic, "status", {"enable.partition.eof": True, **(config or {})})
        self.quiet_s = quiet_s
        self._lock = threading.Lock()
        self._values: dict[str, dict[str, Any]] = {}
        self._eof: set[int] = set()
        self._n_partitions = 0
        self._all_eof_at: float | None = None
        self._ready = threading.Event()

    def start(self, timeout_s: float = 15.0) -> StatusView:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        parts = self._partitions(timeout_s)
        self._n_partitions = len(parts)
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def get(self, customer_id: str) -> dict[str, Any] | None:
        """The latest status value of ``customer_id`` (a copy), or None if none was seen."""
        with self._lock:
            v = self._values.get(customer_id)
            return copy.deepcopy(v) if v is not None else None

    def customers(self) -> list[str]:
        with self._lock:
            return sorted(self._values)

    def _on_message(self, msg: Any) -> None:
        from confluent_kafka import KafkaError

        now = time.monotonic()
        if not self._ready.is_set() and self._all_eof_at is not None and now - self._all_eof_at >= self.quiet_s:
            self._ready.set()
        if msg is None:
            return
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self._eof.add(msg.partition())
                if self._all_eof_at is None and len(self._eof) >= self._n_partitions:
                    self._all_eof_at = now  # the tail of a last batch may still come: wait quiet_s
            else:
                log.warning("customer-status: consumer error: %s", err)
            return
        key = msg.key()
        if key is None:
            return
        customer_id = key.decode("utf-8", "replace")
        value = msg.value()
        with self._lock:
            if value is None:
                self._values.pop(customer_id, None)
                return
            doc = _decode(value)
            if doc is None:
                log.warning("customer-status: undecodable value for %s at offset %d", customer_id, msg.offset())
                return
            self._values[customer_id] = doc


def balance_summary(customer_id: str, value: dict[str, Any]) -> dict[str, Any]:
    """``GET /v1/customers/{id}/balance``: the status value's ``balance`` (balance_view output:
    available, grants[].remaining, overage, ...) with the customer-level ``status``/``reason``."""
    bal = value.get("balance") if isinstance(value.get("balance"), dict) else {}
    return {
        **bal,
        "customer_id": customer_id,
        "status": value.get("status"),
        "reason": value.get("reason"),
        "updated_at_ms": value.get("updated_at_ms"),
    }


def status_summary(customer_id: str, value: dict[str, Any]) -> dict[str, Any]:
    """``GET /v1/customers/{id}/status``: may this customer make requests now?"""
    bal = value.get("balance") if isinstance(value.get("balance"), dict) else {}
    return {
        "customer_id": customer_id,
        "allowed": value.get("status") == "active",
        "status": value.get("status"),
        "reason": value.get("reason"),
        "since_ms": value.get("since_ms"),
        "available": bal.get("available"),
        "updated_at_ms": value.get("updated_at_ms"),
    }


# ------------------------------------------------------------------------------- command builders

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,199}$")
_SCOPE_RE = re.compile(r"^(customer|project:.+|api_key:.+)$")


def _bad(field: str, message: str, code: str = "invalid_field") -> InputError:
    return InputError(message, reason_code=code, field=field)


def _str(
    doc: dict[str, Any], field: str, *, required: bool = True, ident: bool = False, default: str | None = None
) -> str | None:
    v = doc.get(field)
    if v is None:
        if required and default is None:
            raise _bad(field, f"{field!r} is required", "missing_field")
        return default
    if not isinstance(v, str) or not v.strip() or len(v) > 256:
        raise _bad(field, f"{field!r} must be a non-empty string of at most 256 characters")
    if ident and not _ID_RE.match(v):
        raise _bad(field, f"{field!r} must match {_ID_RE.pattern}")
    return v


def _int(doc: dict[str, Any], field: str, *, lo: int, hi: int | None = None, default: int | None = None) -> int:
    v = doc.get(field, default)
    if v is None:
        raise _bad(field, f"{field!r} is required", "missing_field")
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise _bad(field, f"{field!r} must be an integer in {lo}..{hi if hi is not None else '∞'}")
    return v


def _amount(doc: dict[str, Any], field: str, *, positive: bool = False, nonzero: bool = False) -> str:
    v = doc.get(field)
    if not isinstance(v, str):
        raise _bad(field, f'{field!r} must be a decimal string such as "10.00" (never a JSON number)', "invalid_amount")
    try:
        picos = parse_amount(v)
    except LedgerCommandError as exc:
        raise _bad(field, exc.message, "invalid_amount") from None
    if positive and picos <= 0:
        raise _bad(field, f"{field!r} must be positive", "invalid_amount")
    if nonzero and picos == 0:
        raise _bad(field, f"{field!r} must not be zero", "invalid_amount")
    return format_picos(picos)


def parse_instant_ms(value: Any, field: str) -> int | None:
    """Epoch ms from an int (ms) or an ISO-8601 string with a timezone ('Z' allowed); None stays None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _bad(field, f"{field!r} must not be negative")
        return value
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise _bad(field, f"{field!r} is not an ISO-8601 instant: {value!r}") from None
        if dt.tzinfo is None:
            raise _bad(field, f"{field!r} needs a timezone (e.g. 2026-12-31T00:00:00Z)")
        return to_ms(dt)
    raise _bad(field, f"{field!r} must be epoch milliseconds or an ISO-8601 string")


def _customer(doc: dict[str, Any]) -> str:
    """``doc["customer_id"]`` if it has the one allowed form (schemas.models.CUSTOMER_ID_PATTERN)."""
    v = doc.get("customer_id")
    if v is None:
        raise _bad("customer_id", "'customer_id' is required", "missing_field")
    if not is_customer_id(v):
        raise _bad("customer_id", CUSTOMER_ID_RULE, "invalid_customer_id")
    return str(v)


def _check_customer(customer_id: str) -> None:
    _customer({"customer_id": customer_id})


def _base(kind: str, command_id: str, customer_id: str, at: int | None) -> dict[str, Any]:
    return {"type": kind, "command_id": command_id, "customer_id": customer_id, "at_ms": now_ms() if at is None else at}


def authorize_command(doc: dict[str, Any], *, at_ms: int | None = None) -> dict[str, Any]:
    """``authorize`` command from a ``POST /v1/authorize`` body; request_id generated if absent."""
    customer_id = _customer(doc)
    rid = _str(doc, "request_id", required=False, ident=True) or f"req_{uuid.uuid4().hex}"
    return {
        **_base("authorize", f"authorize:{rid}", customer_id, at_ms),
        "request_id": rid,
        "provider": _str(doc, "provider"),
        "model": _str(doc, "model"),
        "model_version": _str(doc, "model_version", required=False),
        "project": _str(doc, "project", required=False),
        "api_key_id": _str(doc, "api_key_id", required=False),
        "input_tokens_estimate": _int(doc, "input_tokens_estimate", lo=0, hi=10**9),
        "max_output_tokens": _int(doc, "max_output_tokens", lo=0, hi=10**9),
    }


def _scope(doc: dict[str, Any]) -> dict[str, list[str] | None] | None:
    v = doc.get("scope")
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) - {"providers", "models", "projects"}:
        raise _bad("scope", "'scope' must be an object with providers / models / projects (lists or null)")
    out: dict[str, list[str] | None] = {}
    for dim in ("providers", "models", "projects"):
        items = v.get(dim)
        if items is not None and (
            not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items)
        ):
            raise _bad(f"scope.{dim}", f"'scope.{dim}' must be a non-empty list of strings or null")
        out[dim] = sorted(set(items)) if items is not None else None
    return out


def grant_command(doc: dict[str, Any], *, kind: str = "grant", at_ms: int | None = None) -> dict[str, Any]:
    """``grant`` / ``top_up`` command. ``grant_id`` generated if absent (then a retry grants twice:
    pass a grant_id for idempotent retries); ``command_id`` defaults to ``<kind>:<grant_id>``."""
    kind = doc.get("type", kind)
    if kind not in ("grant", "top_up"):
        raise _bad("type", "'type' must be 'grant' or 'top_up'")
    customer_id = _customer(doc)
    grant_id = _str(doc, "grant_id", required=False, ident=True) or f"grant_{uuid.uuid4().hex}"
    at = now_ms() if at_ms is None else at_ms
    effective = parse_instant_ms(doc.get("effective_at_ms", doc.get("effective_at")), "effective_at_ms")
    effective = at if effective is None else effective
    expires = parse_instant_ms(doc.get("expires_at_ms", doc.get("expires_at")), "expires_at_ms")
    if expires is not None and expires <= effective:
        raise _bad("expires_at_ms", "expires_at must be after effective_at")
    currency = _str(doc, "currency", default="usd")
    assert currency is not None
    if not re.fullmatch(r"[A-Za-z]{3}", currency):
        raise _bad("currency", "'currency' must be a 3-letter ISO code")
    category = doc.get("category", "paid")
    if category not in ("paid", "promotional"):
        raise _bad("category", "'category' must be 'paid' or 'promotional'")
    command_id = _str(doc, "command_id", required=False, ident=True) or f"{kind}:{grant_id}"
    return {
        **_base(kind, command_id, customer_id, at),
        "grant_id": grant_id,
        "amount": _amount(doc, "amount", positive=True),
        "currency": currency.lower(),
        "effective_at_ms": effective,
        "expires_at_ms": expires,
        "priority": _int(doc, "priority", lo=0, hi=100, default=50),
        "category": category,
        "scope": _scope(doc),
    }


def void_command(doc: dict[str, Any], *, at_ms: int | None = None) -> dict[str, Any]:
    customer_id = _customer(doc)
    grant_id = _str(doc, "grant_id", ident=True)
    return {
        **_base("void", f"void:{grant_id}", customer_id, at_ms),
        "grant_id": grant_id,
        "reason": _str(doc, "reason", default="voided"),
    }


def adjust_command(doc: dict[str, Any], *, at_ms: int | None = None) -> dict[str, Any]:
    customer_id = _customer(doc)
    adj = _str(doc, "adjustment_id", required=False, ident=True) or f"adj_{uuid.uuid4().hex}"
    return {
        **_base("adjust", f"adjust:{adj}", customer_id, at_ms),
        "adjustment_id": adj,
        "amount": _amount(doc, "amount", nonzero=True),
        "reason": _str(doc, "reason"),
        "grant_id": _str(doc, "grant_id", required=False, ident=True),
    }


_RULE_INTS = ("window_ms", "bucket_ms", "baseline_ms", "baseline_multiple")


def _velocity_rule(doc: dict[str, Any], field: str) -> dict[str, Any] | None:
    v = doc.get(field)
    if v is None:
        return None
    allowed = {*_RULE_INTS, "abs_cap", "min", "block"}
    if not isinstance(v, dict) or set(v) - allowed:
        raise _bad(field, f"{field!r} must be an object with keys among {sorted(allowed)}")
    out: dict[str, Any] = {}
    for k in _RULE_INTS:
        if v.get(k) is not None:
            out[k] = _int(v, k, lo=1)
    for k in ("abs_cap", "min"):
        if v.get(k) is not None:
            out[k] = _amount(v, k)
    if "block" in v:
        if not isinstance(v["block"], bool):
            raise _bad(f"{field}.block", "'block' must be true or false")
        out["block"] = v["block"]
    return out


def policy_command(customer_id: str, doc: dict[str, Any], *, at_ms: int | None = None) -> dict[str, Any]:
    """``set_policy``. Optional keys passed on when present: used_alert_pcts, low_balance (amounts),
    hold_ttl_ms, runaway_customer / runaway_api_key (velocity rules; money as decimal strings
    ``abs_cap`` / ``min``), dedupe_window_ms, dedupe_max_ids."""
    _check_customer(customer_id)
    overage = doc.get("overage")
    if overage not in ("block", "allow", "credit_limit"):
        raise _bad("overage", "'overage' must be block, allow or credit_limit")
    if overage == "credit_limit":
        if doc.get("credit_limit") is None:
            raise _bad("credit_limit", "'credit_limit' is required with overage credit_limit", "missing_field")
        limit: str | None = _amount(doc, "credit_limit")
        if limit.startswith("-"):
            raise _bad("credit_limit", "'credit_limit' must not be negative", "invalid_amount")
    elif doc.get("credit_limit") is not None:
        raise _bad("credit_limit", "'credit_limit' is only allowed with overage credit_limit")
    else:
        limit = None
    cmd = {
        **_base(
            "set_policy",
            _str(doc, "command_id", required=False, ident=True) or f"set_policy:{uuid.uuid4().hex}",
            customer_id,
            at_ms,
        ),
        "overage": overage,
        "credit_limit": limit,
    }
    if doc.get("used_alert_pcts") is not None:
        pcts = doc["used_alert_pcts"]
        if not isinstance(pcts, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p <= 1000 for p in pcts
        ):
            raise _bad("used_alert_pcts", "'used_alert_pcts' must be a list of integers in 1..1000")
        cmd["used_alert_pcts"] = sorted(set(pcts))
    if doc.get("low_balance") is not None:
        lows = doc["low_balance"]
        if not isinstance(lows, list):
            raise _bad("low_balance", "'low_balance' must be a list of decimal strings")
        cmd["low_balance"] = [_amount({"low_balance": x}, "low_balance", positive=True) for x in lows]
    for k in ("hold_ttl_ms", "dedupe_window_ms", "dedupe_max_ids"):
        if doc.get(k) is not None:
            cmd[k] = _int(doc, k, lo=1)
    for k in ("runaway_customer", "runaway_api_key"):
        if k in doc:
            cmd[k] = _velocity_rule(doc, k)
    return cmd


def budget_command(customer_id: str, doc: dict[str, Any], *, at_ms: int | None = None) -> dict[str, Any]:
    """``set_budget`` from ``{"budget": {budget_id, scope, scope_value, period, limit, hard?,
    alert_pcts?}, "remove"?: bool}``; checked against the ledger's Budget rules."""
    from meterline.core.ledger import Budget

    _check_customer(customer_id)
    b = doc.get("budget")
    if not isinstance(b, dict):
        raise _bad("budget", "'budget' must be an object", "missing_field")
    budget_id = _str(b, "budget_id", ident=True)
    limit = _amount(b, "limit", positive=True)
    hard = b.get("hard", False)
    pcts = b.get("alert_pcts", [80, 100])
    remove = doc.get("remove", False)
    if not isinstance(hard, bool) or not isinstance(remove, bool):
        raise _bad("budget.hard" if not isinstance(hard, bool) else "remove", "must be true or false")
    if not isinstance(pcts, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pcts):
        raise _bad("budget.alert_pcts", "'alert_pcts' must be a list of integers")
    try:
        Budget(
            budget_id=str(budget_id),
            scope=b.get("scope"),
            scope_value=b.get("scope_value"),
            period=b.get("period"),
            limit_picos=parse_amount(limit),
            hard=hard,
            alert_pcts=tuple(pcts),
        )
    except LedgerCommandError as exc:
        raise _bad("budget", exc.message) from None
    return {
        **_base("set_budget", f"set_budget:{budget_id}:{uuid.uuid4().hex}", customer_id, at_ms),
        "budget": {
            "budget_id": budget_id,
            "scope": b["scope"],
            "scope_value": b.get("scope_value"),
            "period": b["period"],
            "limit": limit,
            "hard": hard,
            "alert_pcts": sorted(set(pcts)),
        },
        "remove": remove,
    }


def block_command(customer_id: str, doc: dict[str, Any], *, blocked: bool, at_ms: int | None = None) -> dict[str, Any]:
    _check_customer(customer_id)
    scope = _str(doc, "scope", default="customer")
    assert scope is not None
    if not _SCOPE_RE.match(scope):
        raise _bad("scope", "'scope' must be 'customer', 'project:<id>' or 'api_key:<id>'")
    reason = doc.get("reason", "manual")
    if reason not in ("manual", "runaway_guard"):
        raise _bad("reason", "'reason' must be 'manual' or 'runaway_guard'")
    kind = "block" if blocked else "unblock"
    return {
        **_base("set_block", f"{kind}:{uuid.uuid4().hex}", customer_id, at_ms),
        "scope": scope,
        "blocked": blocked,
        "reason": reason,
    }
