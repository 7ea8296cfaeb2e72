"""The one HTTPS/loopback rule of the project (config, sources and destinations all use it).

* A host is *loopback* when it is ``localhost`` (or ``*.localhost``, ``localhost.localdomain``,
  ``ip6-localhost``) or an IP literal of the loopback range (``127.0.0.0/8``, ``::1``; IPv6 with
  or without brackets).
* Every endpoint that is not loopback must use ``https://``: credentials and data never travel in
  clear text over a network. Plain ``http://`` is accepted on loopback only (tests, emulators,
  local stores).

This module imports nothing from the rest of the package, so ``config/`` can use it without
depending on ``source/`` or ``destination/``.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class InsecureUrlError(ValueError):
    """A URL that is neither HTTPS nor plain HTTP to a loopback host (see :func:`require_https`)."""


def is_loopback(host: str | None) -> bool:
    """True when ``host`` (a name or IP literal, IPv6 with or without brackets) is loopback."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_https(url: str, what: str) -> str:
    """Return ``url`` when it is HTTPS, or plain HTTP to a loopback host.

    Raises InsecureUrlError (a ValueError) naming ``what`` (e.g. ``"S3 endpoint_url"``) otherwise.
    A URL without a scheme (``host:port``, as ``STORAGE_EMULATOR_HOST`` is often given) is judged
    as HTTP. The message never repeats the URL's path, query or credentials.
    """
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return url
    raise InsecureUrlError(
        f"{what} {parts.scheme}://{parts.hostname or ''} is not allowed: endpoints that are not loopback "
        "must use https://"
    )
