"""Transport rules shared by the object-store destinations (S3, GCS).

* HTTPS is required for every endpoint that is not loopback (``127.0.0.0/8``, ``::1``,
  ``localhost``): credentials and data never travel in clear text over a network.
* Retry timing (attempts, backoff in seconds) is one small value object so tests can make it fast.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from userpilot_sync.errors import DestinationError


def is_loopback_host(host: str | None) -> bool:
    """True when ``host`` (name or IP literal) is the local machine's loopback interface."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_https(url: str, what: str) -> str:
    """Return ``url`` when it is HTTPS, or plain HTTP to a loopback host.

    Raises DestinationError naming ``what`` (e.g. ``"S3 endpoint_url"``) otherwise. A URL without
    a scheme (``host:port``, as ``STORAGE_EMULATOR_HOST`` is often given) is judged as HTTP.
    """
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return url
    raise DestinationError(
        f"{what} {parts.scheme}://{parts.hostname or ''} is not allowed: endpoints that are not loopback "
        "must use https://"
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How transient errors (5xx, SlowDown/429, timeouts, connection resets) are retried.

    ``max_attempts`` counts the first try; waits grow from ``initial_backoff_s`` by ``multiplier``
    up to ``max_backoff_s`` seconds (with jitter); ``deadline_s`` bounds one upload's retries.
    ``connect_timeout_s`` / ``read_timeout_s`` bound each request (seconds).
    """

    max_attempts: int = 8
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    multiplier: float = 2.0
    deadline_s: float = 600.0
    connect_timeout_s: float = 20.0
    read_timeout_s: float = 120.0
