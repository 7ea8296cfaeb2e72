"""Exceptions raised by the userpilot_sync core.

Every error names the sync job and, where it applies, the partition (UTC day, ``YYYY-MM-DD``),
the event type, the column or the file, and says what to do next. Secrets never appear in
messages.
"""

from __future__ import annotations


class UserpilotSyncError(Exception):
    """Base class of every error the exporter raises on purpose."""


class ConfigError(UserpilotSyncError):
    """A sync-job YAML file is invalid (names the file and the key)."""


class WindowError(UserpilotSyncError):
    """A partition lies outside the 365-day window or has not ended yet."""


class SourceError(UserpilotSyncError):
    """The source of raw events failed or delivered something unreadable."""


class ValidationError(UserpilotSyncError):
    """Events of a partition break the Userpilot Event Schema."""


class DestinationError(UserpilotSyncError):
    """Writing to the destination failed or is not allowed."""


class GuardError(ValidationError):
    """A day was refused before upload by a guard (unaccounted rows, a re-export that would shrink
    an export beyond ``checks.max_shrink``); nothing of the day was written."""
