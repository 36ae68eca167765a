"""Time edge cases: timestamps without a zone and host time zones across a DST change never
shift a due time, because every time rotator keeps is aware UTC."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from rotator import model, rotation
from tests.unit.test_engine import SPEC, World

POLICY = rotation.Policy(
    max_age=timedelta(days=1),
    grace=timedelta(hours=1),
    inactive_period=timedelta(hours=2),
    check_interval=timedelta(minutes=5),
)


@pytest.fixture(params=["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe"])
def host_zone(request: pytest.FixtureRequest) -> Iterator[str]:
    before = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    yield request.param
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def test_a_timestamp_without_a_zone_is_utc_whatever_the_host_zone(host_zone: str) -> None:
    assert model.parse_time("2026-03-29T01:30:00") == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    assert model.parse_time("2026-03-29T03:30:00+02:00") == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    assert model.utc(datetime(2026, 10, 25, 1, 30)) == datetime(2026, 10, 25, 1, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    "created",
    [
        datetime(2026, 3, 28, 1, 30, tzinfo=UTC),  # the day before Europe's spring change
        datetime(2026, 10, 24, 0, 30, tzinfo=UTC),  # the day before Europe's autumn change
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),  # New York's autumn change
    ],
)
def test_due_time_is_exactly_max_age_after_creation_across_a_dst_change(
    host_zone: str, created: datetime
) -> None:
    state = model.TargetState(
        current=model.CurrentKey("K1", created, created, created), created_ids=("K1",)
    )
    keys = [model.AccessKey("K1", model.KeyStatus.ACTIVE, created)]
    published = model.Published("K1", created, {}, 1)
    due = created + timedelta(days=1)
    before = rotation.decide(keys, state, published, POLICY, due - timedelta(seconds=1))
    at = rotation.decide(keys, state, published, POLICY, due)
    assert before.due_reason is None and before.next_due == due
    assert at.due_reason == "current key reached max_age"


def test_state_written_with_naive_times_reads_back_as_the_same_utc_instants(
    host_zone: str,
) -> None:
    w = World()
    w.run()
    doc = w.vault.states[SPEC.name].data
    created = doc["current"]["created"]
    doc["current"]["created"] = created.removesuffix("Z")  # as an older writer might have
    state = w.state()
    assert state.current is not None
    assert model.format_time(state.current.created) == created
