"""The soak run (issue 3, item 8): a fleet of twenty targets on two replicas, second-scale timings,
random IAM faults on about one call in ten, replicas restarted (SIGTERM) and killed (kill -9) at
seeded random moments, a consumer using every target's key twice a second. At the end (faults
off, settled): zero consumer failures, zero leaked keys, every target rotated at least five
times, never more than two keys per user. Its figures are printed and, when ROTATOR_SOAK_REPORT
names a file, written there as JSON (the README's reliability section quotes them).

botocore retries every call but CreateAccessKey (``eim.max_attempts: 2``): the adapter gives that
one a single attempt, since a retry after a lost answer would make a second key.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support import servers
from tests.support.fleet import (
    FleetRun,
    RecordingProxy,
    VaultView,
    fleet_config,
    fleet_proxy,
    iam_keys,
    tracked_ids,
    used_after_inactive,
)
from tests.support.harness import daemon_env, started, user_of, wait_for

__all__ = ["daemon_env", "fleet_proxy", "started"]  # fixtures used by name

SEED = 20261203
TARGETS = 20
REPLICAS = 2
FAULT_RATE = 0.1
MIN_ROTATIONS = 5  # per target, after the first key
CHAOS_SECONDS = 150.0  # kills, restarts and faults at least this long
CHAOS_MAX_SECONDS = 450.0  # ... and at most this long, waiting for MIN_ROTATIONS everywhere
EVENT_GAP = (5.0, 14.0)  # seconds between two kill/restart events
DOWN_AFTER_KILL = (0.5, 5.0)  # seconds a killed replica stays down
TIMING = {
    "check_interval": "1s",
    "max_age": "8s",
    "grace": "2s",
    "inactive_period": "2s",
    "verify_timeout": "6s",
}
LOCK_TTL = "3s"
# Retries as in production; CreateAccessKey alone gets one attempt (the adapter's choice).
MAX_ATTEMPTS = 2


def _settled(view: VaultView, admin: Any, target: str) -> bool:
    """Nothing in flight, nothing retiring, and IAM holds exactly the published current key."""
    state = view.state(target)
    published = view.published(target)
    if not state or not published or not state.get("current"):
        return False
    current = state["current"]["key_id"]
    return (
        not state.get("pending")
        and not state.get("intent")
        and not state.get("retiring")
        and published["access_key_id"] == current
        and set(iam_keys(admin, user_of(target))) == {current}
    )


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_soak_two_replicas_random_faults_kills_and_restarts(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    fleet_proxy: RecordingProxy,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    began = time.monotonic()
    cfg, port = fleet_config(tmp_path, iam_admin, vault, fleet_proxy, TARGETS, LOCK_TTL, **TIMING)
    text = cfg.read_text()
    assert "max_attempts: 2" in text
    cfg.write_text(text.replace("max_attempts: 2", f"max_attempts: {MAX_ATTEMPTS}"))
    run = FleetRun(cfg, port, TARGETS, REPLICAS, iam_admin, vault, daemon_env, started, shards=4)
    targets, configs, replicas, view = run.targets, run.configs, run.replicas, run.view
    consumer, observer, tails, check_alive = run.consumer, run.observer, run.tails, run.check_alive
    admin = iam_admin.client()
    rng = random.Random(SEED)
    faults = fleet_proxy.random_faults(rate=FAULT_RATE, seed=SEED)
    schedule: list[str] = []
    sigterm_codes: list[int] = []

    run.start()
    try:
        # --- chaos: faults on, kills and restarts at seeded random moments -------------------
        chaos_began = time.monotonic()
        next_event = chaos_began + rng.uniform(*EVENT_GAP)
        revive: dict[str, float] = {}  # replica name -> when to start it again
        idle = threading.Event()  # never set: its wait is the schedule's clock
        while True:
            now = time.monotonic()
            elapsed = now - chaos_began
            check_alive()
            rotated = min(consumer.distinct(t) for t in targets) - 1
            if elapsed >= CHAOS_SECONDS and rotated >= MIN_ROTATIONS:
                break
            if elapsed >= CHAOS_MAX_SECONDS:
                seen = {t: consumer.distinct(t) for t in targets}
                raise AssertionError(
                    f"after {elapsed:.0f}s some target rotated fewer than {MIN_ROTATIONS} "
                    f"times: {seen}\nstates: "
                    f"{ {t: view.state(t) for t in targets if seen[t] <= MIN_ROTATIONS} }"
                    f"\n{tails()}"
                )
            for replica in replicas:
                if replica.name in revive and now >= revive[replica.name]:
                    del revive[replica.name]
                    replica.start()
                    schedule.append(f"{elapsed:.1f}s start {replica.name}")
            if now >= next_event:
                next_event = now + rng.uniform(*EVENT_GAP)
                replica = rng.choice(replicas)
                action = rng.choice(("kill", "restart"))
                if replica.running():
                    if action == "kill":
                        replica.kill9()
                        revive[replica.name] = now + rng.uniform(*DOWN_AFTER_KILL)
                    else:
                        sigterm_codes.append(replica.restart())
                    schedule.append(f"{elapsed:.1f}s {action} {replica.name}")
            idle.wait(0.2)  # the schedule's tick: kill/restart moments are wall-clock times
        chaos_seconds = time.monotonic() - chaos_began
        faults.remove()
        faults_injected = Counter(kind for _, kind in faults.injected)

        # --- settle: faults off, both replicas up with a long max_age so rotation stops ------
        for replica in replicas:
            if replica.running():
                sigterm_codes.append(replica.terminate())
        for path in configs:
            quiet = path.read_text().replace(f"max_age: {TIMING['max_age']}", "max_age: 1h", 1)
            path.write_text(quiet)
        for replica in replicas:
            replica.start()
        settle_began = time.monotonic()
        try:

            def settled() -> bool:
                check_alive()
                return all(_settled(view, admin, t) for t in targets)

            wait_for(
                settled,
                timeout=90,
                what="every target settled: one key in IAM, current, published, none retiring",
            )
        except AssertionError as exc:
            unsettled = {
                t: (view.state(t), iam_keys(admin, user_of(t)))
                for t in targets
                if not _settled(view, admin, t)
            }
            raise AssertionError(f"{exc}\n{unsettled}\n{tails()}") from None
        settle_seconds = time.monotonic() - settle_began
        rounds = consumer.rounds
        wait_for(lambda: consumer.rounds >= rounds + 2, 30, "the consumer reading the end state")
    finally:
        run.stop_consumers()
    for replica in replicas:
        sigterm_codes.append(replica.terminate())

    # --- the figures -------------------------------------------------------------------------
    leaked: dict[str, list[str]] = {}
    for target in targets:
        extra = set(iam_keys(admin, user_of(target))) - tracked_ids(view.state(target))
        if extra:
            leaked[target] = sorted(extra)
    rotations = {t: consumer.distinct(t) - 1 for t in targets}
    quota_errors = sum(code == "LimitExceeded" for _, code in fleet_proxy.upstream_errors)
    inactive_uses = used_after_inactive(consumer, observer)
    kills = sum(r.kills for r in replicas)
    restarts = sum(r.restarts for r in replicas)
    figures: dict[str, Any] = {
        "seed": SEED,
        "targets": TARGETS,
        "replicas": REPLICAS,
        "duration_seconds": round(time.monotonic() - began, 1),
        "chaos_seconds": round(chaos_seconds, 1),
        "settle_seconds": round(settle_seconds, 1),
        "timing": {**TIMING, "lock_ttl": LOCK_TTL, "eim_max_attempts": MAX_ATTEMPTS},
        "rotations_total": sum(rotations.values()),
        "rotations_min_per_target": min(rotations.values()),
        "create_access_key_calls": fleet_proxy.count("CreateAccessKey"),
        "iam_calls": len(fleet_proxy.calls),
        "fault_rate": FAULT_RATE,
        "faults_injected": sum(faults_injected.values()),
        "faults_by_kind": dict(sorted(faults_injected.items())),
        "kills": kills,
        "restarts": restarts,
        "consumer_reads": consumer.reads,
        "consumer_reads_per_target_per_second": round(
            consumer.reads / TARGETS / (time.monotonic() - began), 2
        ),
        "consumer_uses": consumer.uses,
        "consumer_failures": len(consumer.failures),
        "uses_after_inactive": len(inactive_uses),
        "leaked_keys": sum(len(v) for v in leaked.values()),
        "max_keys_per_user": max(observer.max_keys.values()),
        "quota_errors": quota_errors,
        "schedule": schedule,
    }
    line = json.dumps(figures, sort_keys=True)
    print(f"\nsoak figures: {line}")
    report = os.environ.get("ROTATOR_SOAK_REPORT")
    if report:
        Path(report).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")

    assert consumer.failures == [], consumer.failures[:20]
    assert inactive_uses == [], inactive_uses[:20]
    assert leaked == {}, leaked
    assert min(rotations.values()) >= MIN_ROTATIONS, rotations
    assert max(observer.max_keys.values()) <= 2, observer.max_keys
    assert quota_errors == 0, fleet_proxy.upstream_errors
    assert sigterm_codes and all(code == 0 for code in sigterm_codes), sigterm_codes
    assert kills >= 3 and restarts >= 3, schedule
    assert sum(faults_injected.values()) >= 100, figures
    for target in targets:
        created = set(fleet_proxy.created_keys(user_of(target)))
        assert set(consumer.key_ids[target]) <= created  # only rotator's keys were published
    for replica in replicas:
        assert "Traceback" not in replica.log.read_text(errors="replace"), replica.name
