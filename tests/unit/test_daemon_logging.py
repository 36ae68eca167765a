"""The daemon keeps APScheduler's per-tick "skipped" warning out of the logs."""

from __future__ import annotations

import logging

import pytest

from rotator import daemon  # noqa: F401 - importing it installs the filter


def test_the_skipped_run_warning_is_dropped_and_other_warnings_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler_log = logging.getLogger("apscheduler.scheduler")
    with caplog.at_level(logging.WARNING, logger="apscheduler.scheduler"):
        scheduler_log.warning(
            "Execution of job %r skipped: maximum number of running instances reached (%d)",
            "pass monitoring",
            1,
        )
        scheduler_log.warning("Run time of job %r was missed by %s", "pass monitoring", "0:00:05")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Run time of job 'pass monitoring' was missed by 0:00:05"]
