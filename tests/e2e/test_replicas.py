"""Many replicas on one config (DESIGN.md section 3): three daemon processes share a fleet of
targets through per-target lease locks in Vault, all of their IAM calls through one fault proxy
(no faults) that records every CreateAccessKey per user.

- the fleet rotates with exactly one CreateAccessKey per rotation, no quota error, never more
  than two keys per user, consumers that never fail, and the work spread over the replicas;
- when the replica holding a target's lock is killed in the middle of a rotation (its
  CreateAccessKey, or its verification call, held in the proxy), another replica finishes the
  rotation once the lease expires, and nothing leaks.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rotator import rotation
from tests.support import servers
from tests.support.fleet import (
    FleetRun,
    RecordingProxy,
    authenticates,
    fleet_config,
    fleet_proxy,
    iam_keys,
    tracked_ids,
    used_after_inactive,
)
from tests.support.harness import daemon_env, started, user_of, wait_for

__all__ = ["daemon_env", "fleet_proxy", "started"]  # fixtures used by name

TARGETS = 10
REPLICAS = 3
CHECK_INTERVAL = 1.0
MAX_AGE = 8.0
LOCK_TTL = 3.0
ROTATIONS = 2  # per target, after the first key


class Fleet(FleetRun):
    """Three replicas, a consumer and an observer over every target (see ``FleetRun``)."""

    def __init__(
        self,
        tmp_path: Path,
        admin: servers.MotoAdmin,
        vault: Any,
        proxy: RecordingProxy,
        env: dict[str, str],
        started: list[subprocess.Popen[bytes]],
    ) -> None:
        cfg, port = fleet_config(
            tmp_path,
            admin,
            vault,
            proxy,
            TARGETS,
            f"{LOCK_TTL:g}s",
            check_interval=f"{CHECK_INTERVAL:g}s",
            max_age=f"{MAX_AGE:g}s",
            grace="2s",
            inactive_period="2s",
            verify_timeout="4s",
        )
        super().__init__(cfg, port, TARGETS, REPLICAS, admin, vault, env, started)

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        def check() -> bool:
            self.check_alive()
            return bool(predicate())

        try:
            wait_for(check, timeout, what)
        except AssertionError as exc:
            seen = {t: len(set(k)) for t, k in self.consumer.key_ids.items()}
            raise AssertionError(
                f"{exc}\nkeys seen per target: {seen}\n{self.tails(1500)}"
            ) from None

    def terminate_all(self) -> dict[str, int]:
        return {r.name: r.terminate() for r in self.replicas if r.running()}

    def published_by(self) -> dict[str, set[str]]:
        """replica name -> targets it logged a key_published for."""
        return {r.name: {e["target"] for e in r.events("key_published")} for r in self.replicas}


@pytest.fixture
def fleet(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    fleet_proxy: RecordingProxy,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> Iterator[Fleet]:
    made = Fleet(tmp_path, iam_admin, vault, fleet_proxy, daemon_env, started)
    try:
        yield made
    finally:
        made.stop_consumers()  # the processes are killed by the `started` fixture


@pytest.mark.timeout(240)
def test_three_replicas_rotate_a_fleet_with_one_create_per_rotation_and_share_the_work(
    fleet: Fleet, fleet_proxy: RecordingProxy, iam_admin: servers.MotoAdmin
) -> None:
    fleet.start()
    began = time.monotonic()
    fleet.wait(
        lambda: all(fleet.consumer.distinct(t) >= ROTATIONS + 1 for t in fleet.targets),
        timeout=150,
        what=f"{ROTATIONS} rotations of every target seen by the consumer",
    )
    elapsed = time.monotonic() - began
    codes = fleet.terminate_all()
    fleet.stop_consumers()
    fleet.consumer.read_once()  # what was published last, after every replica stopped
    assert codes == {r.name: 0 for r in fleet.replicas}, codes

    consumer, observer = fleet.consumer, fleet.observer
    assert consumer.failures == [], consumer.failures
    assert used_after_inactive(consumer, observer) == []
    assert consumer.uses >= TARGETS * (ROTATIONS + 1)
    assert not any(code == "LimitExceeded" for _, code in fleet_proxy.upstream_errors), (
        fleet_proxy.upstream_errors
    )
    admin = iam_admin.client()
    for target in fleet.targets:
        user = user_of(target)
        created = fleet_proxy.created_keys(user)
        published = consumer.key_ids[target]
        state = fleet.view.state(target)
        assert state is not None
        pending = {state["pending"]["key_id"]} if state.get("pending") else set()
        # every CreateAccessKey succeeded and made a key that was then published (one may be
        # in flight, pending, when the replicas stopped): exactly one create per rotation
        assert fleet_proxy.create_attempts[user] == [200] * len(created), target
        assert len(set(created)) == len(created)
        assert set(published) <= set(created), (target, published, created)
        assert set(created) - set(published) <= pending, (target, published, created, state)
        assert len(set(published)) == len(published) >= ROTATIONS + 1
        # two replicas racing on one rotation would create twice within moments
        times = fleet_proxy.create_times(user)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(gap >= MAX_AGE / 2 for gap in gaps), (target, gaps)
        assert observer.max_keys[user] <= 2
        assert set(iam_keys(admin, user)) <= tracked_ids(state) | pending, (target, state)
    published_by = fleet.published_by()
    assert sum(bool(targets) for targets in published_by.values()) >= 2, published_by
    assert set().union(*published_by.values()) == set(fleet.targets)
    print(
        f"\nreplicas: {TARGETS} targets x {ROTATIONS} rotations in {elapsed:.0f}s; "
        f"creates {len(fleet_proxy.creates)}; published per replica "
        f"{ {name: len(t) for name, t in published_by.items()} }; "
        f"consumer reads {consumer.reads} uses {consumer.uses}"
    )


KEY_EVENTS = ("key_created", "key_verification", "key_published", "key_deleted")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


HOLD_POINTS = {
    # the replica is killed while its CreateAccessKey for the target is held in the proxy; the
    # call then reaches moto, so a key exists whose secret nobody has: the next holder deletes it
    "create": ("CreateAccessKey", False),
    # killed while the verification of the new key (GetUser signed by it) is held: the pending
    # key and its secret are in Vault, so the next holder verifies and publishes that key
    "verify": ("GetUser", True),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("point", sorted(HOLD_POINTS))
def test_killing_the_lock_holder_mid_rotation_hands_the_target_to_another_replica(
    point: str, fleet: Fleet, fleet_proxy: RecordingProxy, iam_admin: servers.MotoAdmin
) -> None:
    target = fleet.targets[3]
    user = user_of(target)
    fleet.start()
    fleet.wait(
        lambda: all(fleet.consumer.distinct(t) >= 1 for t in fleet.targets),
        timeout=90,
        what="every target bootstrapped",
    )
    first = fleet.view.published(target)
    assert first is not None
    action, signed_by_user = HOLD_POINTS[point]
    hold = fleet_proxy.hold_user(action, user, signed_by_user=signed_by_user)
    assert hold.wait_arrived(timeout=MAX_AGE + 30), f"no {action} of {user} arrived"
    # the replica holding the target's lease right now is the one whose call is held
    lock = fleet.view.lock(target)
    assert lock is not None and not lock.get("released_at"), lock
    pid = int(lock["holder"].split(":")[1])
    [holder] = [r for r in fleet.replicas if r.pid == pid]
    holder.kill9()
    killed_at = time.monotonic()
    killed_wall = datetime.now(UTC)
    creates_before = len(fleet_proxy.created_keys(user))
    hold.release()  # the call goes on to moto; its answer goes to a dead socket
    assert hold.wait_finished(timeout=10)
    lock_then = fleet.view.lock(target)
    assert lock_then is not None and lock_then["holder"] == lock["holder"], lock_then
    orphan = fleet_proxy.created_keys(user)[-1]  # the key the dead replica made
    if point == "verify":
        assert hold.key_ids_caught == [orphan]

    # a taker of the pending key waits as if the dead holder's attempt had reached EIM
    # (rotator.engine._resolve_pending: OUTSCALE counts it towards its lock-out)
    inherited = rotation.verify_delay(1).total_seconds() if point == "verify" else 0.0
    fleet.wait(
        lambda: (
            (fleet.view.published(target) or {}).get("access_key_id")
            not in (None, first["access_key_id"])
        ),
        timeout=LOCK_TTL + 6 * CHECK_INTERVAL + inherited + 10,
        what=f"another replica publishing a new key for {target}",
    )
    took = time.monotonic() - killed_at
    published = fleet.view.published(target)
    assert published is not None
    new_id = published["access_key_id"]
    if point == "verify":
        assert new_id == orphan  # the pending key was taken over, not created again
        assert len(fleet_proxy.created_keys(user)) == creates_before
    else:
        assert new_id != orphan
    takers = [
        r.name
        for r in fleet.replicas
        if any(e["target"] == target and e["key_id"] == new_id for e in r.events("key_published"))
    ]
    assert takers and holder.name not in takers, (holder.name, takers)
    # nobody touched the target's keys while the dead holder's lease was still live
    expires = _time(lock_then["expires_at"])
    acted = [
        (e["event"], e["timestamp"])
        for r in fleet.replicas
        if r is not holder
        for e in r.events()
        if e.get("target") == target
        and e["event"] in KEY_EVENTS
        and _time(e["timestamp"]) > killed_wall
    ]
    assert acted and all(_time(at) >= expires for _, at in acted), (expires, acted)
    assert authenticates(iam_admin, new_id, published["secret_access_key"])

    admin = iam_admin.client()

    def no_stray_key() -> bool:
        state = fleet.view.state(target)
        return (
            state is not None
            and not state.get("pending")
            and not state.get("intent")
            and set(iam_keys(admin, user)) <= tracked_ids(state)
        )

    fleet.wait(no_stray_key, timeout=30, what=f"every key of {user} tracked, none leaked")
    keys = iam_keys(admin, user)
    if point == "create":
        assert orphan not in keys, keys
    fleet.stop_consumers()
    assert fleet.consumer.failures == [], fleet.consumer.failures
    assert used_after_inactive(fleet.consumer, fleet.observer) == []
    assert max(fleet.observer.max_keys.values()) <= 2, fleet.observer.max_keys
    assert not any(code == "LimitExceeded" for _, code in fleet_proxy.upstream_errors)
    codes = fleet.terminate_all()
    assert codes == {r.name: 0 for r in fleet.replicas if r is not holder}, codes
    print(f"\ntakeover ({point}): {target} republished {took:.1f}s after the kill by {takers}")
