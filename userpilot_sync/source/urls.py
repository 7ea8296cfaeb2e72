"""Small URL helpers of the Export API client and its emulator.

``is_loopback`` is re-exported from :mod:`userpilot_sync.net`, the one home of the HTTPS/loopback rule.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from userpilot_sync.net import is_loopback

__all__ = ["is_loopback", "redact_url"]


def redact_url(url: str) -> str:
    """``url`` without query string and fragment (presigned signatures never reach logs/errors)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparseable URL>"
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
