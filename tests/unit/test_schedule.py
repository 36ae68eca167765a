"""When the daemon runs each target's pass: a grid of whole-second slots, one per target.

Targets are dealt round whole-second slots over the first 10 % of check_interval (30 s at most),
so the targets of a slot start together (cheaper than one at a time: benchmarks/FINDINGS.md,
finding 14) while the calls per second stay those of the former 10 % jitter.
"""

from __future__ import annotations

import collections
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from apscheduler.schedulers.background import BackgroundScheduler

from rotator import config, daemon

START = datetime(2026, 12, 4, 16, 0, 0, tzinfo=UTC)


def test_a_slot_fires_every_interval_on_its_grid() -> None:
    trigger = daemon.SlotTrigger(300.0, START + timedelta(seconds=7))

    fired = [START + timedelta(seconds=7)]
    for _ in range(3):
        fired.append(trigger.get_next_fire_time(fired[-1], fired[-1]))

    assert fired[1:] == [START + timedelta(seconds=7 + 300 * k) for k in (1, 2, 3)]


def test_the_pass_after_the_start_sweep_is_a_whole_interval_later_on_the_grid() -> None:
    trigger = daemon.SlotTrigger(300.0, START + timedelta(seconds=29))
    sweep = START + timedelta(seconds=0.4)  # the first pass, at once (next_run_time = now)

    assert trigger.get_next_fire_time(sweep, sweep) == START + timedelta(seconds=329)
    # without a run before it, the next instant of the grid
    assert trigger.get_next_fire_time(None, sweep) == START + timedelta(seconds=29)


def test_a_run_that_ended_late_keeps_the_grid() -> None:
    trigger = daemon.SlotTrigger(60.0, START)
    late = START + timedelta(seconds=59)  # the scheduler passes the time it was due, but even so

    assert trigger.get_next_fire_time(START, late) == START + timedelta(seconds=60)
    assert trigger.get_next_fire_time(START + timedelta(seconds=60), late) == START + timedelta(
        seconds=120
    )


def test_targets_are_dealt_round_whole_second_slots_over_a_tenth_of_the_interval() -> None:
    intervals = {f"t{i:03d}": 300.0 for i in range(100)} | {f"m{i}": 60.0 for i in range(9)}
    intervals |= {f"s{i}": 1.0 for i in range(3)} | {"h0": 3600.0}

    offsets = daemon.slot_offsets(intervals, intervals.__getitem__)

    five_minutes = collections.Counter(offsets[n] for n in intervals if intervals[n] == 300.0)
    assert sorted(five_minutes) == list(range(30))  # 30 s at most: slots 0..29
    assert set(five_minutes.values()) == {3, 4}  # dealt evenly
    assert sorted(offsets[f"m{i}"] for i in range(9)) == [0, 0, 1, 1, 2, 2, 3, 4, 5]  # 6 s
    assert {offsets[f"s{i}"] for i in range(3)} == {0}  # 0.1 s: one slot
    assert offsets["h0"] == 0
    # stable: the same names give the same slots, whatever their order
    assert daemon.slot_offsets(reversed(list(intervals)), intervals.__getitem__) == offsets


def _config(directory: Path, targets: int) -> Path:
    (directory / "token").write_text("a-vault-token\n")
    data = {
        "eim": {"endpoint": "http://127.0.0.1:9", "region": "us-east-1", "max_attempts": 1},
        "vault": {"address": "http://127.0.0.1:9", "auth": {"token_file": "token"}},
        "defaults": {"check_interval": "5m"},
        "targets": [
            {"name": f"t{i:03d}", "user": f"u{i}", "secret_path": f"p/t{i}"} for i in range(targets)
        ],
        "logging": {"format": "json", "level": "warning"},
    }
    path = directory / "rotator.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_daemon_runs_every_target_at_start_then_each_in_its_slot(tmp_path: Path) -> None:
    path = _config(tmp_path, 70)
    running = daemon.Daemon(str(path), config.load(path))
    running._scheduler = BackgroundScheduler(timezone=UTC)  # not started: jobs are only listed
    before = datetime.now(UTC)
    try:
        running._schedule(running._runtime)
        jobs = [job for job in running._scheduler.get_jobs() if job.id.startswith("target:")]
    finally:
        running._runtime.store.close()
    after = datetime.now(UTC)

    assert len(jobs) == 70
    firsts = {job.id: job.next_run_time for job in jobs}
    assert all(before <= first <= after for first in firsts.values())  # the first pass at once
    nexts = {job.id: job.trigger.get_next_fire_time(firsts[job.id], after) for job in jobs}
    base = before.replace(microsecond=0)
    offsets = collections.Counter((n - base).total_seconds() - 300 for n in nexts.values())
    assert sorted(offsets) in (list(range(30)), list(range(1, 31)))  # a second may tick over
    assert max(offsets.values()) - min(offsets.values()) <= 1
