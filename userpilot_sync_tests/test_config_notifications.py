"""Config of checks and notifications: defaults, the documented example, every refusal named by file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from userpilot_sync.config.loader import load_sync_job_file
from userpilot_sync.config.model import (
    NOTIFY_EVENTS,
    ChecksSettings,
    SlackNotification,
    SnsNotification,
    SyncJob,
    VolumeCheck,
    WebhookNotification,
)
from userpilot_sync.errors import ConfigError

MINIMAL = {"name": "acme_prod", "sync_id": "13214", "app_token": "NX-123454"}
HEAD = 'name: acme_prod\nsync_id: "13214"\napp_token: NX-123454\n'

#: The documented example (docs/configuration.md), with `on` unquoted as written there.
EXAMPLE = HEAD + """\
checks:
  volume: {baseline_days: 14, min_ratio: 0.5, max_ratio: 3.0}
  empty_days: error
  max_shrink: 0.5
  deadline_hours: 6
notifications:
  - {kind: webhook, url: "https://hooks.example.com/up", secret_env: UP_WEBHOOK_SECRET, on: [failed, late, check_failed]}
  - {kind: slack, url_env: SLACK_WEBHOOK_URL, on: [failed, late], ui_url: "https://dagster.example.com"}
  - {kind: sns, topic_arn: "arn:aws:sns:us-east-1:123456789012:up-sync", region: us-east-1, endpoint_url: null, on: [failed, exported]}
"""

WEBHOOK = {"kind": "webhook", "url": "https://hooks.example.com/up", "secret_env": "UP_WEBHOOK_SECRET", "on": ["failed"]}
SLACK = {"kind": "slack", "url_env": "SLACK_WEBHOOK_URL", "on": ["failed"]}
SNS = {"kind": "sns", "topic_arn": "arn:aws:sns:us-east-1:123456789012:up-sync", "on": ["failed"]}


def _write(folder: Path, data: dict | str, filename: str = "acme.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _error(tmp_path: Path, overrides: dict) -> str:
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(_write(tmp_path / "jobs", {**MINIMAL, **overrides}))
    return str(err.value)


# ------------------------------------------------------------------------------ valid
def test_documented_example_parses(tmp_path):
    job = load_sync_job_file(_write(tmp_path, EXAMPLE))
    assert job.checks == ChecksSettings(volume=VolumeCheck(baseline_days=14, min_ratio=0.5, max_ratio=3.0),
                                        empty_days="error", max_shrink=0.5, deadline_hours=6)
    webhook, slack, sns = job.notifications
    assert webhook == WebhookNotification(url="https://hooks.example.com/up", secret_env="UP_WEBHOOK_SECRET",
                                          on=("failed", "late", "check_failed"))
    assert webhook.ui_url is None
    assert slack == SlackNotification(url_env="SLACK_WEBHOOK_URL", on=("failed", "late"),
                                      ui_url="https://dagster.example.com")
    assert sns == SnsNotification(topic_arn="arn:aws:sns:us-east-1:123456789012:up-sync", region="us-east-1",
                                  on=("failed", "exported"))
    assert sns.endpoint_url is None


def test_defaults_without_the_sections(tmp_path):
    job = load_sync_job_file(_write(tmp_path, HEAD))
    assert job.notifications == ()
    assert job.checks.volume == VolumeCheck(baseline_days=14, min_ratio=0.5, max_ratio=3.0)
    assert (job.checks.empty_days, job.checks.max_shrink, job.checks.deadline_hours) == ("error", 0.5, 6)


def test_demo_job_keeps_the_defaults():
    from userpilot_sync.config.loader import default_sync_jobs_dir

    job = load_sync_job_file(default_sync_jobs_dir() / "demo.yaml")
    assert job.checks == ChecksSettings() and job.notifications == ()


def test_settings_summary_leaves_checks_and_notifications_out():
    job = SyncJob(**MINIMAL, notifications=[WEBHOOK])
    assert not {"checks", "notifications"} & set(job.settings_summary())


def test_partial_sections_keep_the_other_defaults_and_normalise(tmp_path):
    job = load_sync_job_file(_write(tmp_path / "jobs", {
        **MINIMAL,
        "checks": {"volume": {"baseline_days": 7}, "empty_days": "expected"},
        "notifications": [
            {**WEBHOOK, "url": "http://127.0.0.1:8080/hook", "on": "late"},  # one event as text; loopback http
            {**SLACK, "on": ["exported", "failed", "failed"], "ui_url": "https://dagster.example.com/"},
            {**SNS, "endpoint_url": "http://localhost:5000"},
        ],
    }))
    assert job.checks.volume == VolumeCheck(baseline_days=7) and job.checks.empty_days == "expected"
    assert job.checks.max_shrink == 0.5
    webhook, slack, sns = job.notifications
    assert webhook.on == ("late",) and webhook.url == "http://127.0.0.1:8080/hook"
    assert slack.on == ("failed", "exported")  # documented order, no repeats
    assert slack.ui_url == "https://dagster.example.com"
    assert sns.region == "us-east-1"  # from the topic ARN


def test_quoted_on_key_works_too(tmp_path):
    text = HEAD + 'notifications:\n  - kind: slack\n    url_env: SLACK_WEBHOOK_URL\n    "on": [late]\n'
    assert load_sync_job_file(_write(tmp_path, text)).notifications[0].on == ("late",)


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "overrides, key, reason",
    [
        pytest.param({"notifications": [{**WEBHOOK, "kind": "email"}]}, "notifications.0",
                     "Input tag 'email' found using 'kind' does not match any of the expected tags: 'webhook', "
                     "'slack', 'sns'", id="bad_kind"),
        pytest.param({"notifications": [{**SLACK, "on": ["failed", "fail"]}]}, "notifications.0.slack.on",
                     "unknown event(s) ['fail']; valid events: failed, late, check_failed, exported", id="bad_event"),
        pytest.param({"notifications": [{**SLACK, "on": []}]}, "notifications.0.slack.on",
                     "at least one event is needed; valid events: failed, late, check_failed, exported",
                     id="no_event"),
        pytest.param({"notifications": [{**WEBHOOK, "url": "http://hooks.example.com/up"}]},
                     "notifications.0.webhook.url",
                     "webhook url http://hooks.example.com is not allowed: endpoints that are not loopback must use "
                     "https://", id="http_url_off_loopback"),
        pytest.param({"notifications": [{**SLACK, "ui_url": "http://dagster.example.com"}]},
                     "notifications.0.slack.ui_url", "ui_url http://dagster.example.com is not allowed",
                     id="http_ui_url"),
        pytest.param({"notifications": [{**SNS, "endpoint_url": "http://sns.example.com"}]},
                     "notifications.0.sns.endpoint_url", "endpoint http://sns.example.com is not allowed",
                     id="http_sns_endpoint"),
        pytest.param({"notifications": [{**WEBHOOK, "url": "https://user:pw@hooks.example.com/up"}]},
                     "notifications.0.webhook.url", "webhook url must not contain credentials", id="url_credentials"),
        pytest.param({"notifications": [{**SNS, "topic_arn": "up-sync"}]}, "notifications.0.sns.topic_arn",
                     "'up-sync' is not an SNS topic ARN", id="bad_arn"),
        pytest.param({"notifications": [{**SNS, "region": "eu-west-1"}]}, "notifications.0.sns.region",
                     "region 'eu-west-1' differs from the topic's region 'us-east-1'", id="region_mismatch"),
        pytest.param({"notifications": [WEBHOOK, {**WEBHOOK, "on": ["late"]}]}, "notifications",
                     "entries 0 and 1 both send webhook notifications to the same receiver", id="duplicate_entry"),
        pytest.param({"notifications": [{**WEBHOOK, "on": ["failed"], "secret": "x"}]},
                     "notifications.0.webhook.secret", "Extra inputs are not permitted", id="extra_key"),
        pytest.param({"checks": {"volume": {"min_ratio": 3.0, "max_ratio": 3.0}}}, "checks.volume.min_ratio",
                     "min_ratio (3) must be less than max_ratio (3)", id="min_ratio_not_below_max"),
        pytest.param({"checks": {"volume": {"min_ratio": 4}}}, "checks.volume.min_ratio",
                     "min_ratio (4) must be less than max_ratio (3)", id="min_ratio_above_default_max"),
        pytest.param({"checks": {"volume": {"baseline_days": 0}}}, "checks.volume.baseline_days",
                     "Input should be greater than or equal to 1", id="baseline_days_zero"),
        pytest.param({"checks": {"max_shrink": 1.5}}, "checks.max_shrink",
                     "Input should be less than or equal to 1 (got 1.5)", id="max_shrink_above_1"),
        pytest.param({"checks": {"max_shrink": -0.1}}, "checks.max_shrink",
                     "Input should be greater than or equal to 0", id="max_shrink_negative"),
        pytest.param({"checks": {"deadline_hours": 0}}, "checks.deadline_hours",
                     "Input should be greater than 0", id="deadline_zero"),
        pytest.param({"checks": {"deadline_hours": 73}}, "checks.deadline_hours",
                     "Input should be less than or equal to 72", id="deadline_too_late"),
        pytest.param({"checks": {"empty_days": "ignore"}}, "checks.empty_days",
                     "Input should be 'error', 'warn' or 'expected'", id="empty_days_unknown"),
        pytest.param({"checks": {"volumes": {}}}, "checks.volumes", "Extra inputs are not permitted",
                     id="checks_extra_key"),
    ],
)
def test_refusals_name_the_file_and_the_key(tmp_path, overrides, key, reason):
    text = _error(tmp_path, overrides)
    assert text.startswith("sync job file acme.yaml: invalid configuration\n"), text
    assert f"  key {key}: {reason}" in text, text


SECRET = "whsec-9f8e7d6c5b4a"
SLACK_URL = "https://hooks.slack.com/services/T0AAA/B0BBB/xoxsecrettoken123"


@pytest.mark.parametrize(
    "entry, key",
    [
        pytest.param({**WEBHOOK, "secret_env": SECRET}, "notifications.0.webhook.secret_env", id="webhook_secret_value"),
        pytest.param({**WEBHOOK, "secret_env": "whsec_abcdef0123456789"}, "notifications.0.webhook.secret_env",
                     id="webhook_secret_lowercase_token"),
        pytest.param({**SLACK, "url_env": SLACK_URL}, "notifications.0.slack.url_env", id="slack_url_value"),
    ],
)
def test_a_secret_instead_of_an_env_var_name_is_refused_without_repeating_it(tmp_path, entry, key):
    text = _error(tmp_path, {"notifications": [entry]})
    assert f"  key {key}: is not an environment variable name" in text, text
    assert "the value is not repeated here" in text
    value = entry.get("secret_env") if entry["kind"] == "webhook" else entry["url_env"]
    assert value not in text and "xoxsecret" not in text and "whsec" not in text


def test_a_slack_url_given_as_url_is_refused_without_repeating_it(tmp_path):
    # `url` is not a key of a Slack entry: its webhook URL is a secret and comes from url_env
    text = _error(tmp_path, {"notifications": [{"kind": "slack", "url": SLACK_URL, "on": ["failed"]}]})
    assert "key notifications.0.slack.url: Extra inputs are not permitted (the value is not repeated here)" in text
    assert "key notifications.0.slack.url_env: Field required" in text
    assert "xoxsecrettoken" not in text


def test_unquoted_On_is_still_refused_with_the_quote_hint(tmp_path):
    text = HEAD + "notifications:\n  - {kind: slack, url_env: SLACK_WEBHOOK_URL, On: [late]}\n"
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(_write(tmp_path, text))
    assert "write the key in quotes" in str(err.value)


def test_the_on_key_given_twice_is_refused(tmp_path):
    text = HEAD + 'notifications:\n  - {kind: slack, url_env: SLACK_WEBHOOK_URL, on: [late], "on": [failed]}\n'
    with pytest.raises(ConfigError) as err:
        load_sync_job_file(_write(tmp_path, text))
    assert "key notifications.0.on is given twice" in str(err.value)


def test_events_are_the_documented_four():
    assert NOTIFY_EVENTS == ("failed", "late", "check_failed", "exported")


def test_every_new_key_is_documented():
    """docs/configuration.md names every key of checks and notifications, and the four events."""
    from userpilot_sync.config import model

    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    classes = [model.ChecksSettings, model.VolumeCheck, model.WebhookNotification, model.SlackNotification,
               model.SnsNotification]
    missing = [f"{cls.__name__}.{name}" for cls in classes for name in cls.model_fields if f"`{name}`" not in text]
    missing += [f"event {e}" for e in NOTIFY_EVENTS if f"| `{e}` |" not in text]
    assert missing == []


def test_settings_round_trip_as_resource_json(tmp_path):
    """The resources carry the job as JSON (model_dump -> model_validate_json): nothing is lost."""
    import json

    job = load_sync_job_file(_write(tmp_path, EXAMPLE))
    text = json.dumps(job.model_dump(mode="json", exclude={"source_file"}), sort_keys=True)
    again = SyncJob.model_validate_json(text)
    assert again.checks == job.checks and again.notifications == job.notifications
