"""Notifications of sync jobs (webhook, Slack, SNS): what to say, to whom, once, at least once.

No Dagster here: ``defs/`` calls :class:`Notifier` and backs its :class:`DedupeStore` with the
instance's key-value storage (``userpilot_sync.defs.notify_store.DagsterKVDedupe``).
"""

from userpilot_sync.notify.dedupe import DedupeStore, FileDedupe, MemoryDedupe
from userpilot_sync.notify.delivery import (
    DEDUP_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    MissingSecret,
    NotificationError,
    RetryPolicy,
    deliver,
    sign,
    slack_message,
    verify_signature,
)
from userpilot_sync.notify.notice import Notice, payload
from userpilot_sync.notify.notifier import Notifier, Outcome, entry_label

__all__ = [
    "DEDUP_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DedupeStore",
    "FileDedupe",
    "MemoryDedupe",
    "MissingSecret",
    "Notice",
    "NotificationError",
    "Notifier",
    "Outcome",
    "RetryPolicy",
    "deliver",
    "entry_label",
    "payload",
    "sign",
    "slack_message",
    "verify_signature",
]
