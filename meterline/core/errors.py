"""The meterline exception tree, grouped by what the caller does about it.

    MeterlineError
    ├── InputError              the input is wrong: reject it with the reason, never retry
    │   ├── InvalidEvent        a usage event breaks the contract (reason_code says which rule)
    │   ├── SchemaError         bytes that are not a known Avro single-object record
    │   ├── PriceFileError      a price / rate-card file that cannot be loaded
    │   └── UnpriceableEvent    no price in force for the event's model at its time
    ├── ConfigError             the operator's configuration is wrong: stop at start
    └── TransientError          a dependency is down or slow: retry with backoff
        ├── BrokerUnavailable
        ├── ClickHouseUnavailable
        └── DeliveryFailed      a produced record was not acknowledged by the broker

Every InputError carries a machine-readable ``reason_code`` (snake_case, stable: it lands in the
dead-letter topic and in ``usage_rejected.reason_code``) and a human ``message``.
"""

from __future__ import annotations


class MeterlineError(Exception):
    """Root of every error meterline raises on purpose."""


class InputError(MeterlineError):
    """Rejected input; retrying the same input gives the same error."""

    reason_code: str = "invalid_input"

    def __init__(self, message: str, *, reason_code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str | None]:
        return {"reason_code": self.reason_code, "message": self.message, "field": self.field}


class InvalidEvent(InputError):
    reason_code = "invalid_event"


class SchemaError(InputError):
    reason_code = "undecodable"


class PriceFileError(InputError):
    reason_code = "invalid_price_file"


class UnpriceableEvent(InputError):
    reason_code = "no_price"


class ConfigError(MeterlineError):
    """The configuration cannot work; raised at start-up."""


class TransientError(MeterlineError):
    """A dependency failed in a way that may pass; retry with backoff."""


class BrokerUnavailable(TransientError):
    pass


class ClickHouseUnavailable(TransientError):
    pass


class DeliveryFailed(TransientError):
    def __init__(self, message: str, *, topic: str | None = None, key: bytes | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.key = key
