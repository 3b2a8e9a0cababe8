"""meterline: metering, exact pricing, prepaid credit enforcement and Stripe invoicing for AI usage."""

from __future__ import annotations

__version__ = "0.1.0"
