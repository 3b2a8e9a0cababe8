"""Identifiers the whole system agrees on: the one allowed form of a customer id."""

from __future__ import annotations

import re

__all__ = ["CUSTOMER_ID_PATTERN", "CUSTOMER_ID_RULE", "is_customer_id"]

# THE allowed form of a customer id, for every entrance (HTTP ingest, producer SDK, pricing agent,
# credit commands, the Stripe webhook, API keys): 1-128 ASCII characters, letters, digits and
# ``. _ : @ + = -``, starting with a letter or digit. No whitespace, control, format (RTL override,
# zero-width) or non-ASCII characters, no ``/``: a customer id is safe in a URL path, a file name,
# an HTTP header and a log line, and one customer has exactly one spelling (no normalisation).
CUSTOMER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}$"
CUSTOMER_ID_RULE = "a customer id is 1-128 characters from A-Z a-z 0-9 . _ : @ + = -, starting with a letter or digit"
_CUSTOMER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}")


def is_customer_id(value: object) -> bool:
    """True if ``value`` is a string of the allowed customer-id form (:data:`CUSTOMER_ID_PATTERN`)."""
    return type(value) is str and _CUSTOMER_ID.fullmatch(value) is not None
