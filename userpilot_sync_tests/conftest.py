"""Shared fixtures. Server fixtures (S3, GCS, Export API emulator) live in their own modules."""

from __future__ import annotations

import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

pytest_plugins = [
    "userpilot_sync_tests.fixtures_core",
    "userpilot_sync_tests.fixtures_api",
    "userpilot_sync_tests.fixtures_storage",
]
