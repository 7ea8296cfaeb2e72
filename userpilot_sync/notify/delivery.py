"""Delivery of one notice to one receiver (webhook, Slack, SNS), at least once, without leaking secrets.

* **Webhook**: ``POST <url>`` with the JSON :func:`~userpilot_sync.notify.notice.payload` and the
  headers ``X-Userpilot-Sync-Timestamp: <unix seconds>`` and ``X-Userpilot-Sync-Signature:
  sha256=<hex HMAC-SHA256 of "<timestamp>.<raw body>" under the secret>`` (:func:`sign`,
  :func:`verify_signature`). The secret is read from the env var ``secret_env`` when sending.
* **Slack**: ``POST`` of a Block Kit message to the incoming-webhook URL read from ``url_env``.
* **SNS**: ``sns.publish`` of the JSON payload (``Subject`` short, ``MessageAttributes`` ``event``
  and ``sync_job``) with boto3; credentials from the standard AWS chain.

Connection errors, timeouts, HTTP 5xx and 429 (SNS: throttling and 5xx) are retried with
exponential backoff and jitter (``Retry-After`` honoured) within :class:`RetryPolicy`'s bounds;
other 4xx (and 3xx: redirects are not followed) fail at once. Every error is a
:class:`NotificationError` naming the sync job and the entry (``notifications[1] (slack)``), never
the webhook secret, the Slack URL or AWS credentials: they are redacted from every message and
from the URLs httpx logs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import httpx
import tenacity

from userpilot_sync.net import InsecureUrlError, require_https
from userpilot_sync.config.model import SlackNotification, SnsNotification, WebhookNotification
from userpilot_sync.errors import UserpilotSyncError
from userpilot_sync.notify.notice import Notice, payload, utc_now

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Userpilot-Sync-Signature"
TIMESTAMP_HEADER = "X-Userpilot-Sync-Timestamp"
EVENT_HEADER = "X-Userpilot-Sync-Event"
DEDUP_HEADER = "X-Userpilot-Sync-Dedup-Key"
USER_AGENT = "userpilot-sync-notify/1"
#: SNS error codes worth another attempt (besides any HTTP 5xx).
_SNS_TRANSIENT = {"Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException",
                  "ServiceUnavailable", "InternalError", "InternalFailure", "RequestTimeout",
                  "RequestTimeoutException", "KMSThrottlingException"}
#: Env vars of the AWS chain whose values must never appear in a message.
_AWS_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")

Entry = WebhookNotification | SlackNotification | SnsNotification


# ---------------------------------------------------------------------------------- errors, policy
class NotificationError(UserpilotSyncError):
    """A notice could not be delivered to one receiver (names the sync job and the entry, no secret).

    ``attempts`` is how many requests were made (0: nothing was sent, e.g. a missing env var).
    """

    def __init__(self, message: str, attempts: int = 0):
        super().__init__(message)
        self.attempts = attempts


class MissingSecret(NotificationError):
    """The env var holding a webhook secret or a Slack webhook URL is not set (or not usable)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of one delivery's retries (at least once, but never for ever).

    ``attempts`` counts the first request; waits grow from ``initial_wait_s`` (doubling, full
    jitter) up to ``max_wait_s``; no retry starts after ``total_s`` seconds; each request times
    out after ``timeout_s`` seconds.
    """

    attempts: int = 5
    initial_wait_s: float = 1.0
    max_wait_s: float = 30.0
    total_s: float = 120.0
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_wait_s < 0 or self.max_wait_s < 0 or self.total_s < 0 or self.timeout_s <= 0:
            raise ValueError("RetryPolicy: attempts >= 1, waits and total_s >= 0, timeout_s > 0")


class _Transient(Exception):
    """A failure worth another attempt (connection, timeout, 5xx, 429); ``retry_after`` in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Permanent(Exception):
    """A failure another attempt would not fix (4xx other than 429, a redirect, bad credentials)."""


# ---------------------------------------------------------------------------------- signatures
def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of b"<timestamp>.<body>" under secret>`` (the signature header's value)."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(secret: str | bytes, timestamp: str, body: bytes, signature: str, *,
                     tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """True when ``signature`` is :func:`sign` of ``timestamp`` and the raw ``body`` under ``secret``
    and the timestamp is within ``tolerance_s`` seconds of ``now`` (replays are refused)."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except (TypeError, ValueError):
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


# ---------------------------------------------------------------------------------- redaction
class _Secrets:
    """Secret texts currently in use; redacted from our messages and from the URLs httpx logs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._texts: dict[str, int] = {}

    def add(self, *texts: str) -> None:
        with self._lock:
            for t in texts:
                if t and len(t) >= 4:
                    self._texts[t] = self._texts.get(t, 0) + 1

    def discard(self, *texts: str) -> None:
        with self._lock:
            for t in texts:
                if t in self._texts:
                    self._texts[t] -= 1
                    if not self._texts[t]:
                        del self._texts[t]

    def redact(self, text: str, extra: tuple[str, ...] = ()) -> str:
        with self._lock:
            texts = sorted({*self._texts, *(t for t in extra if t and len(t) >= 4)}, key=len, reverse=True)
        for t in texts:
            text = text.replace(t, "***")
        return text


_SECRETS = _Secrets()


class _RedactSecretUrls(logging.Filter):
    """Replaces secrets (a Slack webhook URL) in the arguments of httpx's ``HTTP Request: ...`` lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            args = []
            for a in record.args:
                if isinstance(a, (str, httpx.URL)):
                    redacted = _SECRETS.redact(str(a))
                    a = redacted if redacted != str(a) else a
                args.append(a)
            record.args = tuple(args)
        if isinstance(record.msg, str):
            record.msg = _SECRETS.redact(record.msg)
        return True


_httpx_log = logging.getLogger("httpx")
if not any(isinstance(f, _RedactSecretUrls) for f in _httpx_log.filters):
    _httpx_log.addFilter(_RedactSecretUrls())


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


# ---------------------------------------------------------------------------------- one delivery
@dataclass
class _Ctx:
    sync_job: str
    label: str  # notifications[1] (slack)
    notice: Notice
    retry: RetryPolicy
    environ: Mapping[str, str]
    clock: Callable[[], datetime]
    sleep: Callable[[float], None]
    secrets: tuple[str, ...] = ()

    @property
    def who(self) -> str:
        day = f" of {self.notice.partition}" if self.notice.partition else ""
        return f"sync job {self.sync_job!r}: {self.label}: the {self.notice.event} notice{day}"

    def redact(self, text: str) -> str:
        aws = tuple(self.environ.get(k, "") for k in _AWS_SECRETS)
        return _SECRETS.redact(text, self.secrets + aws)

    def secret_env(self, key: str, name: str, what: str) -> str:
        value = self.environ.get(name, "")
        if not value.strip():
            raise MissingSecret(
                f"sync job {self.sync_job!r}: {self.label}: the environment variable {name} ({key}, {what}) is not set "
                f"or empty; set it in the environment of the Dagster processes (nothing was sent)"
            )
        return value.strip()


def _wait(policy: RetryPolicy) -> Callable[[tenacity.RetryCallState], float]:
    def wait(state: tenacity.RetryCallState) -> float:
        base = min(policy.max_wait_s, policy.initial_wait_s * (2 ** (state.attempt_number - 1)))
        delay = random.uniform(base / 2, base)  # equal jitter: never a zero wait, never above the cap
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, policy.max_wait_s))
        return delay

    return wait


def _with_retries(ctx: _Ctx, attempt: Callable[[], None]) -> int:
    """Run ``attempt`` until it succeeds, retrying :class:`_Transient` failures; return the attempts made."""
    started = time.monotonic()

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: %s (attempt %d of %d); retrying in %.2f s", ctx.who, ctx.redact(str(exc)),
                    state.attempt_number, ctx.retry.attempts, delay)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Transient),
        stop=tenacity.stop_after_attempt(ctx.retry.attempts) | tenacity.stop_before_delay(ctx.retry.total_s),
        wait=_wait(ctx.retry),
        sleep=ctx.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    attempts = 0

    def counted() -> None:
        nonlocal attempts
        attempts += 1
        attempt()

    try:
        retrying(counted)
    except _Transient as exc:
        raise NotificationError(
            f"{ctx.who} was not delivered: gave up after {attempts} attempt(s) in "
            f"{time.monotonic() - started:.1f} s; last error: {ctx.redact(str(exc))}",
            attempts,
        ) from None
    except _Permanent as exc:
        raise NotificationError(
            f"{ctx.who} was not delivered: {ctx.redact(str(exc))} (not retried)", attempts,
        ) from None
    return attempts


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _post(ctx: _Ctx, url: str, body: bytes, headers: dict[str, str], shown_as: str) -> None:
    """One POST; raises _Transient / _Permanent with a message that shows the URL as ``shown_as``."""
    try:
        with httpx.Client(timeout=ctx.retry.timeout_s, follow_redirects=False) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.TimeoutException as exc:
        raise _Transient(f"timed out after {ctx.retry.timeout_s:g} s talking to {shown_as} ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        raise _Transient(f"could not reach {shown_as} ({type(exc).__name__}: {ctx.redact(str(exc))})") from None
    status = response.status_code
    if 200 <= status < 300:
        return
    snippet = ctx.redact(response.text[:200].strip().replace("\n", " "))
    what = f"HTTP {status} from {shown_as}" + (f": {snippet}" if snippet else "")
    if status == 429 or status >= 500 or status == 408:
        raise _Transient(what, _retry_after(response.headers.get("Retry-After")))
    if 300 <= status < 400:
        raise _Permanent(f"{what} (a redirect; redirects are not followed: give the final URL)")
    raise _Permanent(what)


def _json_body(notice: Notice) -> bytes:
    return json.dumps(payload(notice), ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


def _send_webhook(entry: WebhookNotification, ctx: _Ctx) -> int:
    secret = ctx.secret_env("secret_env", entry.secret_env, "the webhook signing secret")
    ctx.secrets = (secret,)
    notice = ctx.notice.with_ui(entry.ui_url)
    body = _json_body(notice)

    def attempt() -> None:
        timestamp = str(int(ctx.clock().timestamp()))
        headers = {
            "Content-Type": "application/json", "User-Agent": USER_AGENT,
            TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(secret, timestamp, body),
            EVENT_HEADER: notice.event, DEDUP_HEADER: notice.dedup_key,
        }
        _post(ctx, entry.url, body, headers, _host(entry.url))

    return _with_retries(ctx, attempt)


_SLACK_TITLES = {"failed": "Day failed", "late": "Day late", "check_failed": "Check failed", "exported": "Day exported"}
_SLACK_ICONS = {"failed": ":red_circle:", "late": ":hourglass:", "check_failed": ":warning:", "exported": ":white_check_mark:"}


def _mrkdwn(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(notice: Notice) -> dict[str, Any]:
    """The Slack Block Kit message of a notice (with a plain ``text`` fallback for notifications)."""
    day = notice.partition or "(no day)"
    title = f"{_SLACK_TITLES[notice.event]}: {notice.sync_job} {day}"
    fields = [
        {"type": "mrkdwn", "text": f"*Sync job*\n{_mrkdwn(notice.sync_job)}"},
        {"type": "mrkdwn", "text": f"*Day*\n{day}"},
        {"type": "mrkdwn", "text": f"*Event*\n`{notice.event}`"},
        {"type": "mrkdwn", "text": f"*App token*\n{_mrkdwn(notice.app_token)}"},
    ]
    message = notice.message if len(notice.message) <= 2900 else notice.message[:2899] + "…"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        {"type": "section", "fields": fields},
        {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(message) or "(no message)"}},
    ]
    context = [f"dedup key `{_mrkdwn(notice.dedup_key)}`", f"at {notice.occurred_at}"]
    if notice.run_url:
        context.insert(0, f"<{notice.run_url}|Open run {notice.run_id[:8] if notice.run_id else ''} in Dagster>")
    elif notice.run_id:
        context.insert(0, f"run `{notice.run_id}`")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]})
    text = f"{_SLACK_ICONS[notice.event]} userpilot_sync {notice.sync_job} {day}: {notice.event} — {notice.message}"
    if notice.run_url:
        text += f" ({notice.run_url})"
    return {"text": text[:3000], "blocks": blocks}


def _send_slack(entry: SlackNotification, ctx: _Ctx) -> int:
    url = ctx.secret_env("url_env", entry.url_env, "the Slack incoming-webhook URL")
    path = urlsplit(url).path
    ctx.secrets = (url, path) if len(path) > 1 else (url,)
    _SECRETS.add(*ctx.secrets)
    try:
        try:
            require_https(url, f"the Slack webhook URL in {entry.url_env}")
        except InsecureUrlError as exc:
            raise MissingSecret(f"sync job {ctx.sync_job!r}: {ctx.label}: {exc} (nothing was sent)") from None
        notice = ctx.notice.with_ui(entry.ui_url)
        body = json.dumps(slack_message(notice), ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT}
        shown = f"{_host(url)} (the URL in {entry.url_env})"
        return _with_retries(ctx, lambda: _post(ctx, url, body, headers, shown))
    finally:
        _SECRETS.discard(*ctx.secrets)


def _sns_subject(notice: Notice) -> str:
    subject = f"userpilot_sync {notice.event}: {notice.sync_job} {notice.partition or ''}".strip()
    return subject[:100]


def _send_sns(entry: SnsNotification, ctx: _Ctx) -> int:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, NoCredentialsError, PartialCredentialsError

    notice = ctx.notice
    message = json.dumps(payload(notice), ensure_ascii=False, default=str)
    attributes = {
        "event": {"DataType": "String", "StringValue": notice.event},
        "sync_job": {"DataType": "String", "StringValue": notice.sync_job},
    }
    if notice.partition:
        attributes["partition"] = {"DataType": "String", "StringValue": notice.partition}
    request: dict[str, Any] = {"TopicArn": entry.topic_arn, "Message": message, "Subject": _sns_subject(notice),
                               "MessageAttributes": attributes}
    if entry.topic_arn.endswith(".fifo"):
        request["MessageGroupId"] = notice.sync_job
        request["MessageDeduplicationId"] = hashlib.sha256(
            f"{notice.dedup_key}:{notice.occurred_at}:{notice.run_id or ''}".encode()).hexdigest()
    config = Config(retries={"total_max_attempts": 1}, connect_timeout=ctx.retry.timeout_s,
                    read_timeout=ctx.retry.timeout_s)
    shown = f"SNS topic {entry.topic_arn}"
    try:
        client = boto3.client("sns", region_name=entry.region, endpoint_url=entry.endpoint_url, config=config)
    except BotoCoreError as exc:
        raise NotificationError(f"{ctx.who} was not delivered: {ctx.redact(str(exc))} (nothing was sent)") from None

    def attempt() -> None:
        try:
            client.publish(**request)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            what = f"{shown}: {code or 'error'} (HTTP {status}): {ctx.redact(str(error.get('Message', '')))[:300]}"
            if code in _SNS_TRANSIENT or status >= 500 or status == 429:
                raise _Transient(what) from None
            raise _Permanent(what) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise _Permanent(f"{shown}: no usable AWS credentials ({type(exc).__name__}); set the standard AWS "
                             "credentials (environment, profile or role)") from None
        except (BotoConnectionError, HTTPClientError) as exc:
            raise _Transient(f"could not reach {shown} ({type(exc).__name__})") from None

    return _with_retries(ctx, attempt)


def deliver(
    entry: Entry,
    notice: Notice,
    *,
    label: str | None = None,
    retry: RetryPolicy | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], datetime] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> int:
    """Deliver ``notice`` to one notification entry; return the attempts it took.

    ``label`` names the entry in messages (default: its kind). Raises :class:`NotificationError`
    (:class:`MissingSecret` for a missing env var) naming the sync job and the entry, never a secret.
    """
    ctx = _Ctx(
        sync_job=notice.sync_job, label=label or f"notifications entry ({entry.kind})", notice=notice,
        retry=retry or RetryPolicy(), environ=os.environ if environ is None else environ,
        clock=clock or utc_now, sleep=sleep or time.sleep,
    )
    if isinstance(entry, WebhookNotification):
        return _send_webhook(entry, ctx)
    if isinstance(entry, SlackNotification):
        return _send_slack(entry, ctx)
    if isinstance(entry, SnsNotification):
        return _send_sns(entry, ctx)
    raise TypeError(f"not a notification entry: {type(entry).__name__}")
