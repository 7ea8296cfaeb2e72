"""Small URL helpers shared by the Export API client, its emulator and the config model."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


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


def redact_url(url: str) -> str:
    """``url`` without query string and fragment (presigned signatures never reach logs/errors)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparseable URL>"
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
