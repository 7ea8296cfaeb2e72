"""Transport rules shared by the object-store destinations (S3, GCS).

* HTTPS is required for every endpoint that is not loopback (``127.0.0.0/8``, ``::1``,
  ``localhost``): credentials and data never travel in clear text over a network. The rule
  itself lives in :mod:`userpilot_sync.net` (shared with the config and the sources); this
  module raises it as a DestinationError.
* Retry timing (attempts, backoff in seconds) is one small value object so tests can make it fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from userpilot_sync import net
from userpilot_sync.errors import DestinationError

#: The old name of :func:`userpilot_sync.net.is_loopback` (one loopback rule for the whole project).
is_loopback_host = net.is_loopback


def require_https(url: str, what: str) -> str:
    """Return ``url`` when it is HTTPS, or plain HTTP to a loopback host (:func:`userpilot_sync.net.require_https`).

    Raises DestinationError naming ``what`` (e.g. ``"S3 endpoint_url"``) otherwise. A URL without
    a scheme (``host:port``, as ``STORAGE_EMULATOR_HOST`` is often given) is judged as HTTP.
    """
    try:
        return net.require_https(url, what)
    except net.InsecureUrlError as exc:
        raise DestinationError(str(exc)) from None


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
