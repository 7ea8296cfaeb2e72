"""Notification delivery against real local receivers: signed webhooks, Slack, SNS (moto), retries, dedupe.

Receivers are HTTP servers on loopback (``http.server`` in a thread) that record the raw requests
and answer from a script; SNS goes through the moto server with an SQS queue subscribed to the
topic. Secrets (webhook secret, Slack URL, AWS secret key) must appear in no payload, log line
or error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from userpilot_sync.config.model import SyncJob
from userpilot_sync.notify import (
    DEDUP_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    FileDedupe,
    MemoryDedupe,
    MissingSecret,
    Notice,
    NotificationError,
    Notifier,
    RetryPolicy,
    deliver,
    payload,
    sign,
    verify_signature,
)

NOW = datetime(2026, 3, 10, 9, 30, 0, tzinfo=timezone.utc)
DAY = "2026-03-09"
RUN = "4c9797b1-0a4e-4f7e-9a55-1f2e3d4c5b6a"
SECRET = "whsec-Zq81-very-secret-signing-key"
SLACK_TOKEN = "xoxTOKEN9f8e7d6c5b4a"
FAST = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=0.05, total_s=5, timeout_s=5)
BASE = {"name": "acme_prod", "sync_id": "13214", "app_token": "NX-123454"}


def clock() -> datetime:
    return NOW


# ---------------------------------------------------------------------------------- a local receiver
@dataclass
class Received:
    path: str
    headers: dict
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records POSTs and answers ``script`` in turn (then 200)."""

    script: list = field(default_factory=list)  # (status, body, headers) per request
    requests: list[Received] = field(default_factory=list)

    def __post_init__(self):
        receiver = self
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status, text, headers = receiver.script.pop(0) if receiver.script else (200, b"ok", {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def job_with(*entries: dict) -> SyncJob:
    return SyncJob(**BASE, notifications=list(entries))


def webhook_entry(receiver: Receiver, on=("failed", "late", "check_failed"), **extra) -> dict:
    return {"kind": "webhook", "url": f"{receiver.url}/hooks/up", "secret_env": "UP_WEBHOOK_SECRET", "on": list(on),
            **extra}


def slack_entry(on=("failed", "late"), **extra) -> dict:
    return {"kind": "slack", "url_env": "SLACK_WEBHOOK_URL", "on": list(on), **extra}


@pytest.fixture
def env(monkeypatch, receiver):
    monkeypatch.setenv("UP_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"{receiver.url}/services/T0/B0/{SLACK_TOKEN}")


def notifier(job: SyncJob, store=None, retry=FAST) -> Notifier:
    return Notifier(job, dedupe=store if store is not None else MemoryDedupe(), clock=clock, retry=retry)


def failed(job: SyncJob, day: str | None = DAY, event: str = "failed", message: str = "the Export API answered 500") -> Notice:
    return Notice.for_job(job, event, partition=day, message=message, run_id=RUN,
                          details={"error": "ExportApiError"}, clock=clock)


# ---------------------------------------------------------------------------------- notice and payload
def test_notice_payload_and_dedup_key():
    job = job_with()
    notice = failed(job)
    body = payload(notice)
    assert body == {
        "version": 1, "event": "failed", "sync_job": "acme_prod", "sync_id": "13214", "app_token": "NX-123454",
        "partition": DAY, "run_id": RUN, "run_url": None, "message": "the Export API answered 500",
        "details": {"error": "ExportApiError"}, "dedup_key": "acme_prod:2026-03-09:failed",
        "occurred_at": "2026-03-10T09:30:00Z",
    }
    assert notice.with_ui("https://dagster.example.com/").run_url == f"https://dagster.example.com/runs/{RUN}"
    assert failed(job, day=None).dedup_key == "acme_prod::failed"
    with pytest.raises(ValueError, match="valid events: failed, late, check_failed, exported"):
        Notice.for_job(job, "broken", partition=DAY, message="x")
    with pytest.raises(ValueError, match="not a UTC day"):
        Notice.for_job(job, "failed", partition="2026-3-9", message="x")


def test_verify_signature_refuses_tampering_and_replays():
    body = b'{"event":"failed"}'
    sig = sign(SECRET, 1773135000, body)
    assert verify_signature(SECRET, "1773135000", body, sig, now=1773135100)
    assert not verify_signature(SECRET, "1773135000", body + b" ", sig, now=1773135100)
    assert not verify_signature("other", "1773135000", body, sig, now=1773135100)
    assert not verify_signature(SECRET, "1773135000", body, sig, now=1773135000 + 301)  # too old: a replay


# ---------------------------------------------------------------------------------- webhook
def test_webhook_is_signed_over_the_raw_body(receiver, env):
    job = job_with(webhook_entry(receiver, ui_url="https://dagster.example.com"))
    outcomes = notifier(job).notify(failed(job))
    assert [(o.status, o.attempts, o.entry) for o in outcomes] == [("sent", 1, "notifications[0] (webhook)")]
    (req,) = receiver.requests
    assert req.path == "/hooks/up"
    assert req.headers["content-type"] == "application/json"
    timestamp = req.headers[TIMESTAMP_HEADER.lower()]
    assert timestamp == str(int(NOW.timestamp()))
    assert req.headers[SIGNATURE_HEADER.lower()] == sign(SECRET, timestamp, req.body)
    assert verify_signature(SECRET, timestamp, req.body, req.headers[SIGNATURE_HEADER.lower()], now=NOW.timestamp())
    assert req.headers[EVENT_HEADER.lower()] == "failed"
    assert req.headers[DEDUP_HEADER.lower()] == "acme_prod:2026-03-09:failed"
    body = json.loads(req.body)
    assert body["event"] == "failed" and body["sync_job"] == "acme_prod" and body["partition"] == DAY
    assert body["sync_id"] == "13214" and body["app_token"] == "NX-123454" and body["run_id"] == RUN
    assert body["dedup_key"] == "acme_prod:2026-03-09:failed"
    assert body["run_url"] == f"https://dagster.example.com/runs/{RUN}"
    assert SECRET.encode() not in req.body


def test_503_twice_then_200_is_delivered_once_after_3_attempts(receiver, env):
    receiver.script[:] = [(503, b"busy", {}), (503, b"busy", {"Retry-After": "0"}), (200, b"ok", {})]
    job = job_with(webhook_entry(receiver))
    started = time.monotonic()
    (outcome,) = notifier(job).notify(failed(job))
    assert (outcome.status, outcome.attempts) == ("sent", 3)
    assert len(receiver.requests) == 3
    assert len({r.body for r in receiver.requests}) == 1  # the same notice each time
    assert time.monotonic() - started < 2


def test_a_400_is_not_retried_and_the_error_names_job_and_entry(receiver, env):
    receiver.script[:] = [(400, b"bad request", {})]
    job = job_with(webhook_entry(receiver))
    (outcome,) = notifier(job).notify(failed(job))
    assert (outcome.status, outcome.attempts) == ("failed", 1)
    assert len(receiver.requests) == 1
    assert "sync job 'acme_prod'" in outcome.error and "notifications[0] (webhook)" in outcome.error
    assert "HTTP 400" in outcome.error and "not retried" in outcome.error
    assert SECRET not in outcome.error
    receiver.script[:] = [(400, b"bad request", {})]
    with pytest.raises(NotificationError, match=r"sync job 'acme_prod': .*\(webhook\).*HTTP 400"):
        deliver(job.notifications[0], failed(job), retry=FAST, clock=clock)


def test_retries_are_bounded_and_a_failed_delivery_is_sent_again_later(receiver, env):
    receiver.script[:] = [(503, b"down", {})] * 3
    job = job_with(webhook_entry(receiver))
    n = notifier(job)
    (first,) = n.notify(failed(job))
    assert (first.status, first.attempts) == ("failed", 3) and "gave up after 3 attempt(s)" in first.error
    (second,) = n.notify(failed(job))  # not marked as emitted: sent again, now delivered
    assert (second.status, second.attempts) == ("sent", 1)
    assert len(receiver.requests) == 4
    assert n.notify(failed(job))[0].status == "duplicate"


def test_total_time_bounds_the_retries(receiver, env):
    receiver.script[:] = [(503, b"down", {})] * 50
    job = job_with(webhook_entry(receiver))
    # 50 attempts 0.1-0.2 s apart (equal jitter) would take 5-10 s; the 2 s total stops them (wide
    # enough for a loaded machine to fit 2 attempts, narrow enough to prove the bound): at most
    # 2.0 / 0.1 retries after the first request, far fewer than 50
    slow = RetryPolicy(attempts=50, initial_wait_s=0.2, max_wait_s=0.2, total_s=2.0, timeout_s=5)
    started = time.monotonic()
    (outcome,) = notifier(job, retry=slow).notify(failed(job))
    assert outcome.status == "failed" and 2 <= outcome.attempts <= 21
    assert time.monotonic() - started < 4.5


def test_connection_refused_is_retried_then_fails(env):
    from userpilot_sync_tests.fixtures_storage import free_port

    job = job_with({"kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/x", "secret_env": "UP_WEBHOOK_SECRET",
                    "on": ["failed"]})
    (outcome,) = notifier(job).notify(failed(job))
    assert (outcome.status, outcome.attempts) == ("failed", 3)
    assert "could not reach http://127.0.0.1" in outcome.error and "ConnectError" in outcome.error


def test_missing_secret_env_names_job_entry_and_variable(receiver, monkeypatch):
    monkeypatch.delenv("UP_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("SLACK_WEBHOOK_URL", raising=False)
    job = job_with(webhook_entry(receiver), slack_entry())
    outcomes = notifier(job).notify(failed(job))
    assert [(o.status, o.attempts) for o in outcomes] == [("failed", 0), ("failed", 0)]
    assert "sync job 'acme_prod': notifications[0] (webhook): the environment variable UP_WEBHOOK_SECRET" in outcomes[0].error
    assert "sync job 'acme_prod': notifications[1] (slack): the environment variable SLACK_WEBHOOK_URL" in outcomes[1].error
    assert receiver.requests == []
    with pytest.raises(MissingSecret):
        deliver(job.notifications[1], failed(job), retry=FAST)


def test_only_subscribed_entries_get_the_event(receiver, env):
    job = job_with(webhook_entry(receiver, on=("failed",)), slack_entry(on=("exported",)))
    outcomes = notifier(job).notify(failed(job, event="exported", message="day exported: 7 files"))
    assert [o.entry for o in outcomes] == ["notifications[1] (slack)"]
    assert [r.path for r in receiver.requests] == [f"/services/T0/B0/{SLACK_TOKEN}"]


# ---------------------------------------------------------------------------------- slack
def test_slack_message_is_readable(receiver, env):
    job = job_with(slack_entry(ui_url="https://dagster.example.com"))
    (outcome,) = notifier(job).notify(failed(job, message="3 event types <failed> & more"))
    assert outcome.status == "sent"
    (req,) = receiver.requests
    message = json.loads(req.body)
    text = json.dumps(message)
    for needle in ("acme_prod", DAY, "failed", "3 event types &lt;failed&gt; &amp; more",
                   f"<https://dagster.example.com/runs/{RUN}|Open run 4c9797b1 in Dagster>"):
        assert needle in text, needle
    assert message["text"].startswith(":red_circle: userpilot_sync acme_prod 2026-03-09: failed")
    assert message["blocks"][0] == {"type": "header", "text": {"type": "plain_text", "text": "Day failed: acme_prod 2026-03-09"}}


def test_slack_url_must_be_https_off_loopback(monkeypatch):
    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"http://hooks.slack.com/services/T0/B0/{SLACK_TOKEN}")
    job = job_with(slack_entry())
    (outcome,) = notifier(job).notify(failed(job))
    assert outcome.status == "failed" and outcome.attempts == 0
    assert "must use https://" in outcome.error and SLACK_TOKEN not in outcome.error


def test_secrets_never_appear_in_payloads_logs_or_errors(receiver, env, caplog):
    # receivers that echo what they got: the webhook its secret, Slack the request path (its token)
    secret_echo = f"bad signature, expected one made with {SECRET}".encode()
    token_echo = f"no such hook /services/T0/B0/{SLACK_TOKEN}".encode()
    receiver.script[:] = [(500, secret_echo, {}), (400, secret_echo, {}), (500, token_echo, {}), (400, token_echo, {})]
    job = job_with(webhook_entry(receiver), slack_entry())
    with caplog.at_level(logging.DEBUG):
        outcomes = notifier(job).notify(failed(job))
    assert [o.status for o in outcomes] == ["failed", "failed"]
    texts = [o.error for o in outcomes] + [caplog.text] + [r.message for r in caplog.records]
    texts += [r.body.decode() for r in receiver.requests]
    for text in texts:
        assert SECRET not in text and SLACK_TOKEN not in text, text
    assert all("***" in o.error for o in outcomes)  # the echoed secrets were redacted
    assert any("notifications[1] (slack)" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------- dedupe
def test_dedupe_sends_once_per_job_day_event_until_rearmed(receiver, env):
    job = job_with(webhook_entry(receiver))
    n = notifier(job)
    assert n.notify(failed(job))[0].status == "sent"
    assert n.notify(failed(job, message="failed again"))[0].status == "duplicate"
    assert len(receiver.requests) == 1
    assert n.notify(failed(job, day="2026-03-08"))[0].status == "sent"  # another day
    assert n.notify(failed(job, event="late"))[0].status == "sent"  # another event
    assert len(receiver.requests) == 3
    n.rearm("acme_prod", DAY)  # the day was exported successfully
    assert n.notify(failed(job))[0].status == "sent"  # a later failure is sent again
    assert len(receiver.requests) == 4
    assert n.notify(failed(job, day=None))[0].status == "sent"  # notices without a day: never deduplicated
    assert n.notify(failed(job, day=None))[0].status == "sent"
    with pytest.raises(ValueError):
        n.rearm("other_job", DAY)


def test_dedupe_is_per_receiver(receiver, env):
    receiver.script[:] = [(200, b"ok", {}), (400, b"no", {})]  # webhook ok, slack refused
    job = job_with(webhook_entry(receiver), slack_entry())
    n = notifier(job)
    assert [o.status for o in n.notify(failed(job))] == ["sent", "failed"]
    assert [o.status for o in n.notify(failed(job))] == ["duplicate", "sent"]  # only the failed one again
    assert len(receiver.requests) == 3


def test_file_dedupe_survives_a_new_notifier(receiver, env, tmp_path):
    job = job_with(webhook_entry(receiver))
    assert notifier(job, FileDedupe(tmp_path / "sent.json")).notify(failed(job))[0].status == "sent"
    assert notifier(job, FileDedupe(tmp_path / "sent.json")).notify(failed(job))[0].status == "duplicate"
    notifier(job, FileDedupe(tmp_path / "sent.json")).rearm("acme_prod", DAY)
    assert notifier(job, FileDedupe(tmp_path / "sent.json")).notify(failed(job))[0].status == "sent"
    assert len(receiver.requests) == 2


def test_dagster_kv_dedupe(receiver, env):
    import dagster as dg

    from userpilot_sync.defs.notify_store import DagsterKVDedupe

    job = job_with(webhook_entry(receiver))
    instance = dg.DagsterInstance.ephemeral()  # the same SQL key-value table as a persistent instance
    store = DagsterKVDedupe(instance)
    assert notifier(job, store).notify(failed(job))[0].status == "sent"
    assert notifier(job, DagsterKVDedupe(instance)).notify(failed(job))[0].status == "duplicate"
    notifier(job, store).rearm("acme_prod", DAY)
    assert notifier(job, store).notify(failed(job))[0].status == "sent"
    assert len(receiver.requests) == 2
    store.set("a", "1")
    store.set("a", "2")
    assert store.get("a") == "2"
    store.set("a", None)
    assert store.get("a") is None and store.get("never") is None
    # MySQL's unique index on kvs.key covers 64 characters: stored keys are hashed to fit
    long_key = "userpilot_sync/notify/" + "j" * 63 + ":2026-03-09:check_failed:0123456789abcdef"
    assert len(DagsterKVDedupe.storage_key(long_key)) <= 64
    assert instance.run_storage.get_cursor_values({DagsterKVDedupe.storage_key("a")}) == {
        DagsterKVDedupe.storage_key("a"): ""}


# ---------------------------------------------------------------------------------- SNS (moto)
@pytest.fixture
def aws_admin(moto_s3, monkeypatch):
    key_id, secret = moto_s3.keys["admin"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_s3.endpoint, secret


@pytest.mark.integration
def test_sns_publishes_the_payload_to_subscribers(aws_admin, caplog):
    import boto3

    endpoint, aws_secret = aws_admin
    sns = boto3.client("sns", endpoint_url=endpoint, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    topic = sns.create_topic(Name="up-sync-test")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="up-sync-test")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)

    job = job_with({"kind": "sns", "topic_arn": topic, "endpoint_url": endpoint, "on": ["failed", "exported"]})
    with caplog.at_level(logging.DEBUG):
        (outcome,) = notifier(job).notify(failed(job))
    assert (outcome.status, outcome.attempts) == ("sent", 1)

    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=2)["Messages"]
    (envelope,) = [json.loads(m["Body"]) for m in messages]
    assert envelope["Subject"] == "userpilot_sync failed: acme_prod 2026-03-09"
    assert envelope["MessageAttributes"]["event"]["Value"] == "failed"
    assert envelope["MessageAttributes"]["sync_job"]["Value"] == "acme_prod"
    body = json.loads(envelope["Message"])
    assert body == payload(failed(job))
    assert aws_secret not in caplog.text and aws_secret not in envelope["Message"]


@pytest.mark.integration
def test_sns_unknown_topic_fails_at_once_naming_job_and_entry(aws_admin):
    endpoint, aws_secret = aws_admin
    job = job_with({"kind": "sns", "topic_arn": "arn:aws:sns:us-east-1:123456789012:does-not-exist",
                    "endpoint_url": endpoint, "on": ["failed"]})
    (outcome,) = notifier(job).notify(failed(job))
    assert (outcome.status, outcome.attempts) == ("failed", 1)
    assert "sync job 'acme_prod': notifications[0] (sns)" in outcome.error and "not retried" in outcome.error
    assert aws_secret not in outcome.error


@pytest.mark.integration
def test_sns_unreachable_endpoint_is_retried(aws_admin):
    from userpilot_sync_tests.fixtures_storage import free_port

    job = job_with({"kind": "sns", "topic_arn": "arn:aws:sns:us-east-1:123456789012:up-sync",
                    "endpoint_url": f"http://127.0.0.1:{free_port()}", "on": ["failed"]})
    (outcome,) = notifier(job).notify(failed(job))
    assert (outcome.status, outcome.attempts) == ("failed", 3) and "could not reach SNS topic" in outcome.error
