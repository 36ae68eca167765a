"""The daemon keeps APScheduler's per-tick "skipped" warning out of the logs, and says what a
reload cannot move."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator import config, daemon  # importing daemon installs the filter


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


def _settings(tmp_path: Path, name: str, vault: dict[str, Any], eim: dict[str, Any]) -> Any:
    path = tmp_path / name
    path.write_text(
        yaml.safe_dump(
            {
                "vault": {"address": "https://vault.example:8200", **vault},
                "eim": eim,
                "targets": [{"name": "monitoring", "user": "watcher_1", "secret_path": "m/w1"}],
            }
        )
    )
    return config.load(path)


@pytest.mark.parametrize(
    ("vault", "eim", "said"),
    [
        ({"mount": "kv"}, {}, ["the states moved from https://vault.example:8200 secret/rotator"]),
        ({"state_path": "rotator-v2"}, {}, ["to https://vault.example:8200 secret/rotator-v2"]),
        ({}, {"region": "us-east-2"}, ["eim endpoint changed from https://eim.eu-west-2"]),
        ({}, {}, []),
    ],
)
def test_a_reload_moving_the_states_or_the_iam_account_is_said_in_a_warning(
    tmp_path: Path, vault: dict[str, Any], eim: dict[str, Any], said: list[str]
) -> None:
    old = _settings(tmp_path, "old.yaml", {}, {})
    new = _settings(tmp_path, "new.yaml", vault, eim)

    notes = daemon.moved_storage(old, new)

    assert len(notes) == len(said)
    for note, start in zip(notes, said, strict=True):
        assert start in note
