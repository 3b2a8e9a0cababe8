"""Alert webhooks: deliver every record of the ``alerts`` topic to the operator's HTTPS endpoints,
signed, retried while the receiver is down, and delivered once per alert_id and URL.

    dispatcher = WebhookDispatcher(bootstrap, topic, group_id, urls=[...], secret=..., store_path=...)
    dispatcher.start()          # background thread; dispatcher.stop() to end
    verify_signature(secret, request.headers["Meterline-Signature"], raw_body)   # receiver side

See docs/alerts.md for the payload, headers and retry policy.
"""

from __future__ import annotations

from pipeline.alerts._dispatcher import WebhookDispatcher
from pipeline.alerts._signing import ALERT_ID_HEADER, SIGNATURE_HEADER, sign, verify_signature
from pipeline.alerts._store import DeliveredStore

__all__ = ["ALERT_ID_HEADER", "SIGNATURE_HEADER", "DeliveredStore", "WebhookDispatcher", "sign", "verify_signature"]
