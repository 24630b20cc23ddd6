"""Alerts: to the log always, and as JSON to ``PUBLISH_PLATFORM_ALERT_WEBHOOK`` when set.

The webhook URL may carry a token, so it is never logged; payloads carry batch references and
reasons, never configuration.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger("publish_platform.alerts")


def send_alert(kind: str, summary: str, details: dict[str, Any]) -> bool:
    """Log the alert and post it to the webhook; True if the webhook accepted it."""
    payload = {
        "kind": kind,
        "summary": summary,
        "at": datetime.now(UTC).isoformat(),
        "details": details,
    }
    logger.error("ALERT %s: %s", kind, summary)
    url = os.environ.get("PUBLISH_PLATFORM_ALERT_WEBHOOK")
    if not url:
        return False
    request = urllib.request.Request(
        url,
        data=json.dumps(payload, default=str).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return 200 <= response.status < 300
    except OSError as exc:
        logger.error("alert webhook failed: %s", type(exc).__name__)
        return False
