"""kill -9 at every boundary between two external calls of a rotation, then a restart.

Each case runs the daemon (``python -m rotator run``) through the IAM fault proxy and a Vault proxy,
holds one call of a rotation in the proxy, kills the daemon with SIGKILL while that call is held,
releases the call (forwarded: the change is applied and its answer lost; failed: never applied),
restarts the daemon and checks the invariants of DESIGN.md section 1:

- the published key authenticates, whenever it is read, through the whole test (a consumer
  uses it four times a second, through the proxy), and it is Active in IAM;
- a consumer never read a key that the rotator had not verified;
- never more than ``max_keys`` (2) keys for a user;
- once the rotation is complete, every key of the user is current, pending or retiring in the
  state (a key whose secret was lost is deleted);
- the foreign key of a second target (made by hand before the start) is never deactivated or
  deleted;
- the interrupted rotation (or retirement) completes within two passes after the restart.

Every case also checks that the release did what its name says (the snapshot taken at restart),
so "applied then lost" and "never applied" are both really exercised.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest

from rotator import rotation
from tests.support import servers
from tests.support.crashkit import (
    BYSTANDER_SECRET,
    BYSTANDER_USER,
    Daemon,
    VaultProxy,
    Watcher,
    crash_config,
    keys_of,
    make_bystander,
    published_id,
    settled,
    start_daemon,
    state_of,
    tracked,
    verified_ids,
)
from tests.support.faultproxy import FaultProxy
from tests.support.harness import daemon_env, started, wait_for

__all__ = ["daemon_env", "started"]  # fixtures used by name

# The verification cases refuse a new key for YOUNG seconds: the attempt made at once fails, the
# next one (10 s later, the schedule's second step) passes. verify_timeout must cover that second
# attempt and be shorter than max_age, hence their longer max_age.
YOUNG = 1.0
TIMING = {
    "check_interval": "1s",
    "max_age": "3s",
    "grace": "1s",
    "inactive_period": "1s",
    "verify_timeout": "2s",
}
YOUNG_TIMING = {**TIMING, "max_age": "12s", "verify_timeout": "11s"}
LOCK_TTL = 2.0


class HoldLike(Protocol):
    def wait_arrived(self, timeout: float = ...) -> bool: ...
    def release(self, forward: bool = True) -> None: ...
    def wait_finished(self, timeout: float = ...) -> bool: ...


@dataclass
class Case:
    """What a crash point's functions see."""

    iam: FaultProxy
    vproxy: VaultProxy
    vault: Any
    admin: servers.MotoAdmin
    first_key: str | None = None  # the bootstrap key, published before the hold

    @property
    def state_path(self) -> str:
        return f"{self.vault.mount}/data/rotator/targets/monitoring"

    @property
    def secret_path(self) -> str:
        return f"{self.vault.mount}/data/monitoring/watcher_1"


@dataclass
class Snapshot:
    """IAM and Vault just after the held call was released, before the restart."""

    keys: dict[str, str]
    state: dict[str, Any] | None
    published: str | None
    user_exists: bool

    @property
    def untracked(self) -> set[str]:
        return set(self.keys) - (tracked(self.state) if self.state else set())

    @property
    def pending(self) -> dict[str, Any] | None:
        return None if self.state is None else self.state.get("pending")


@dataclass(frozen=True)
class Point:
    id: str
    boundary: str  # the call held, between the calls before and after it
    phase: str  # bootstrap (first pass) | rotation | retire (of the first key)
    forward: bool
    install: Callable[[Case], HoldLike]
    at_restart: Callable[[Case, Snapshot], bool]  # the release did what the id says
    young: bool = False


def _state_write(case: Case, match: Callable[[dict[str, Any]], bool]) -> HoldLike:
    return case.vproxy.hold_write(
        lambda path, data: path == case.state_path and data is not None and match(data)
    )


def _intent(case: Case) -> HoldLike:
    return _state_write(case, lambda d: bool(d.get("intent")) and not d.get("pending"))


def _pending(case: Case) -> HoldLike:
    return _state_write(case, lambda d: bool(d.get("pending")) and d["pending"]["attempts"] == 0)


def _promote(case: Case) -> HoldLike:
    return _state_write(
        case,
        lambda d: (
            not d.get("pending")
            and bool(d.get("current"))
            and d["current"]["key_id"] != case.first_key
        ),
    )


def _publish(case: Case) -> HoldLike:
    return case.vproxy.hold_write(lambda path, _data: path == case.secret_path)


def _verify_second(case: Case) -> HoldLike:
    # the rotation's first verification attempt is refused (young key); hold the second
    refused = case.iam.count("GetUser", status=403)
    wait_for(
        lambda: case.iam.count("GetUser", status=403) > refused,
        30,
        "the first verification attempt of the rotation refused",
    )
    return case.iam.hold(action="GetUser")


def _new_pending(snap: Snapshot, case: Case, attempts: int) -> bool:
    p = snap.pending
    return p is not None and p["key_id"] != case.first_key and p["attempts"] == attempts


POINTS = [
    Point(
        "identity-CreateUser-applied",
        "GetUser -> CreateUser -> AddUserToGroup (identity, first pass)",
        "bootstrap",
        True,
        lambda c: c.iam.hold(action="CreateUser"),
        lambda c, s: s.user_exists and s.state is None,
    ),
    Point(
        "identity-CreateUser-never",
        "GetUser -> CreateUser -> AddUserToGroup (identity, first pass)",
        "bootstrap",
        False,
        lambda c: c.iam.hold(action="CreateUser"),
        lambda c, s: not s.user_exists and s.state is None,
    ),
    Point(
        "intent-write-applied",
        "ListAccessKeys -> state write (intent) -> CreateAccessKey",
        "rotation",
        True,
        _intent,
        lambda c, s: bool(s.state and s.state.get("intent")) and len(s.keys) == 1,
    ),
    Point(
        "intent-write-never",
        "ListAccessKeys -> state write (intent) -> CreateAccessKey",
        "rotation",
        False,
        _intent,
        lambda c, s: bool(s.state and not s.state.get("intent")) and len(s.keys) == 1,
    ),
    Point(
        "CreateAccessKey-applied",
        "state write (intent) -> CreateAccessKey -> state write (pending)",
        "rotation",
        True,
        lambda c: c.iam.hold(action="CreateAccessKey"),
        lambda c, s: len(s.untracked) == 1 and bool(s.state and s.state.get("intent")),
    ),
    Point(
        "CreateAccessKey-never",
        "state write (intent) -> CreateAccessKey -> state write (pending)",
        "rotation",
        False,
        lambda c: c.iam.hold(action="CreateAccessKey"),
        lambda c, s: len(s.keys) == 1 and bool(s.state and s.state.get("intent")),
    ),
    Point(
        "pending-write-applied",
        "CreateAccessKey -> state write (pending, secret) -> GetUser (verify)",
        "rotation",
        True,
        _pending,
        lambda c, s: _new_pending(s, c, 0) and not s.untracked,
    ),
    Point(
        "pending-write-never",
        "CreateAccessKey -> state write (pending, secret) -> GetUser (verify)",
        "rotation",
        False,
        _pending,
        lambda c, s: s.pending is None and len(s.untracked) == 1,
    ),
    Point(
        "verify-attempt-1",
        "state write (pending) -> GetUser signed by the new key, attempt 1 -> state write",
        "rotation",
        True,
        lambda c: c.iam.hold(action="GetUser"),
        lambda c, s: _new_pending(s, c, 0),
        young=True,
    ),
    Point(
        "verify-attempt-2",
        "state write (attempt 1 refused) -> GetUser signed by the new key, attempt 2 -> publish",
        "rotation",
        False,
        _verify_second,
        lambda c, s: _new_pending(s, c, 1),
        young=True,
    ),
    Point(
        "publish-applied",
        "GetUser (verified) -> Vault write of the published secret -> state write (promote)",
        "rotation",
        True,
        _publish,
        lambda c, s: s.published not in (None, c.first_key) and s.pending is not None,
    ),
    Point(
        "publish-never",
        "GetUser (verified) -> Vault write of the published secret -> state write (promote)",
        "rotation",
        False,
        _publish,
        lambda c, s: s.published == c.first_key and s.pending is not None,
    ),
    Point(
        "promote-write-applied",
        "published secret write -> state write (promote) -> UpdateAccessKey (later pass)",
        "rotation",
        True,
        _promote,
        lambda c, s: (
            s.published != c.first_key
            and s.pending is None
            and bool(s.state and s.state["current"]["key_id"] == s.published)
        ),
    ),
    Point(
        "promote-write-never",
        "published secret write -> state write (promote) -> UpdateAccessKey (later pass)",
        "rotation",
        False,
        _promote,
        lambda c, s: s.published != c.first_key and s.pending is not None,
    ),
    Point(
        "UpdateAccessKey-deactivate-applied",
        "ListAccessKeys -> UpdateAccessKey Inactive (grace over) -> state write",
        "retire",
        True,
        lambda c: c.iam.hold(action="UpdateAccessKey"),
        lambda c, s: s.keys.get(c.first_key or "") == "Inactive",
    ),
    Point(
        "UpdateAccessKey-deactivate-never",
        "ListAccessKeys -> UpdateAccessKey Inactive (grace over) -> state write",
        "retire",
        False,
        lambda c: c.iam.hold(action="UpdateAccessKey"),
        lambda c, s: s.keys.get(c.first_key or "") == "Active",
    ),
    Point(
        "DeleteAccessKey-applied",
        "ListAccessKeys -> DeleteAccessKey (inactive period over) -> state write",
        "retire",
        True,
        lambda c: c.iam.hold(action="DeleteAccessKey"),
        lambda c, s: c.first_key not in s.keys,
    ),
    Point(
        "DeleteAccessKey-never",
        "ListAccessKeys -> DeleteAccessKey (inactive period over) -> state write",
        "retire",
        False,
        lambda c: c.iam.hold(action="DeleteAccessKey"),
        lambda c, s: s.keys.get(c.first_key or "") == "Inactive",
    ),
]

# Every boundary of a rotation named in the protocol: the crash points must cover them all.
BOUNDARIES = (
    "identity",
    "intent-write",
    "CreateAccessKey",
    "pending-write",
    "verify-attempt-1",
    "verify-attempt-2",
    "publish",
    "promote-write",
    "UpdateAccessKey",
    "DeleteAccessKey",
)
COVERED: dict[str, str] = {}  # crash point id -> outcome, filled by the cases that ran


def test_the_crash_points_cover_every_boundary_of_a_rotation() -> None:
    ids = [p.id for p in POINTS]
    assert len(set(ids)) == len(ids)
    for boundary in BOUNDARIES:
        assert any(i.startswith(boundary) for i in ids), boundary
    # both releases wherever the held call changes something
    for boundary in BOUNDARIES:
        if not boundary.startswith("verify"):
            releases = {p.forward for p in POINTS if p.id.startswith(boundary)}
            assert releases == {True, False}, boundary
    print("crash points:", *(f"{p.id}: {p.boundary}" for p in POINTS), sep="\n  ")


def _snapshot(case: Case) -> Snapshot:
    try:
        case.admin.client().get_user(UserName="watcher_1")
        exists = True
    except Exception:
        exists = False
    return Snapshot(
        keys=keys_of(case.admin),
        state=state_of(case.vault),
        published=published_id(case.vault),
        user_exists=exists,
    )


# the points whose crash leaves a key IAM made and no state names: the restart holds it Inactive
HELD_ORPHAN = frozenset({"CreateAccessKey-applied", "pending-write-never"})


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _first_pass_after(daemon: Daemon, moment: datetime) -> int:
    """The number of the first pass that started at or after ``moment`` (one more if none)."""
    summaries = daemon.summaries()
    for index, summary in enumerate(summaries, start=1):
        started = _time(summary["timestamp"]) - timedelta(milliseconds=summary["duration_ms"])
        if started >= moment:
            return index
    return len(summaries) + 1


def _first_pass_index(daemon: Daemon, done: Callable[[dict[str, Any]], bool]) -> int | None:
    for index, summary in enumerate(daemon.summaries(), start=1):
        if done(summary):
            return index
    return None


@pytest.mark.timeout(150)
@pytest.mark.parametrize("point", POINTS, ids=[p.id for p in POINTS])
def test_kill_9_while_a_call_is_held_then_restart_keeps_every_invariant(
    point: Point,
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    iam_proxy: FaultProxy,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    foreign = make_bystander(iam_admin)
    vproxy = VaultProxy(vault.address)
    vproxy.start()
    watcher = Watcher(iam_admin, vault, iam_proxy.endpoint)
    daemons: list[Daemon] = []
    try:
        cfg = crash_config(
            tmp_path,
            iam_admin,
            vault,
            endpoint=iam_proxy.endpoint,
            vault_address=vproxy.address,
            lock_ttl=f"{LOCK_TTL:g}s",
            **(YOUNG_TIMING if point.young else TIMING),
        )
        case = Case(iam_proxy, vproxy, vault, iam_admin)
        if point.young:
            iam_proxy.reject_young_keys(YOUNG)
        hold = point.install(case) if point.phase == "bootstrap" else None
        first = start_daemon(cfg, daemon_env, started, tmp_path / "first.log")
        daemons.append(first)
        watcher.start()
        if hold is None:
            wait_for(
                lambda: (
                    published_id(vault) is not None
                    and published_id(vault, BYSTANDER_SECRET) is not None
                    and (state := state_of(vault)) is not None
                    and not state.get("pending")
                    and not state.get("intent")
                ),
                60,
                "both targets bootstrapped",
                first.process,
            )
            case.first_key = published_id(vault)
            hold = point.install(case)
        assert hold.wait_arrived(timeout=40), f"the held call of {point.id} never came"
        first.kill9()
        hold.release(forward=point.forward)
        assert hold.wait_finished(timeout=15)
        snap = _snapshot(case)
        assert point.at_restart(case, snap), f"{point.id}: unexpected state at restart {snap}"

        restarted_at = time.monotonic()
        second = start_daemon(cfg, daemon_env, started, tmp_path / "second.log")
        daemons.append(second)
        wait_for(
            lambda: any(e.get("event") == "daemon_started" for e in second.events()),
            15,
            "the restarted daemon up",
            second.process,
        )
        old = case.first_key

        def complete() -> bool:
            state = state_of(vault)
            if state is None or state.get("pending") or state.get("intent"):
                return False
            published = published_id(vault)
            if point.phase == "retire":
                return old not in keys_of(iam_admin) and old not in tracked(state)
            return (
                published is not None
                and published != old
                and state["current"]["key_id"] == published
            )

        # startup, the killed daemon's lease running out, two passes, the verification wait, and
        # the wait for a pending key another process counted (rotator.engine._resolve_pending:
        # its last attempt may have reached EIM, whose lock-out counts it), then a margin
        pending = snap.pending
        inherited = (
            rotation.verify_delay(int(pending.get("attempts", 0)) + 1).total_seconds()
            if pending is not None and not pending.get("verified_at")
            else 0.0
        )
        budget = 5 + LOCK_TTL + 2 * 1 + inherited + (10 + YOUNG if point.young else 2) + 10
        wait_for(complete, budget, f"the interrupted step of {point.id} completed", second.process)
        elapsed = time.monotonic() - restarted_at
        wait_for(lambda: settled(vault, iam_admin), 20, "no key without a role", second.process)

        def finished(summary: dict[str, Any]) -> bool:
            """The restarted daemon's pass that finished the interrupted step."""
            if point.phase == "retire":
                return any(old in action for action in summary["actions"])
            # not "ok": with second-scale timings the next rotation may already be due and wait
            # a pass for a free slot (blocked) while the interrupted one is complete
            return summary["published_key_id"] not in (None, old) and summary["error"] is None

        wait_for(
            lambda: _first_pass_index(second, finished) is not None,
            15,
            "the pass summary of the restarted daemon",
            second.process,
        )
        uses = watcher.uses
        wait_for(lambda: watcher.uses >= uses + 3, 10, "the consumer using the key", second.process)
        assert second.terminate() == 0
    finally:
        watcher.finish()
        vproxy.stop()

    index = _first_pass_index(second, finished)
    logs = "".join(d.log.read_text() for d in daemons)
    # an interrupted rotation's orphan is held Inactive (inactive_period, 1 s) before its
    # deletion frees the slot: the first pass starting after the hold ends finishes the step
    # (with one pass to spare, as for the other points)
    held = [e for e in second.events() if e.get("event") == "key_quarantined"]
    assert bool(held) == (point.id in HELD_ORPHAN), (point.id, held)
    limit = 2 if not held else _first_pass_after(second, _time(held[0]["delete_at"])) + 1
    assert index is not None and index <= limit, (index, limit, second.summaries())
    assert watcher.problems == [], watcher.problems
    # at least the three uses after the restart (none before it when the crash came before the
    # first key was published)
    assert watcher.uses >= 3
    assert max(watcher.most_keys.values()) <= 2
    assert set(watcher.key_ids) <= verified_ids(*daemons), (watcher.key_ids, verified_ids(*daemons))
    assert watcher.history[foreign] == ["Active"] and foreign not in watcher.deleted
    assert keys_of(iam_admin, BYSTANDER_USER)[foreign] == "Active"
    assert "Traceback" not in logs
    for secret in watcher.secrets:
        assert secret not in logs
    COVERED[point.id] = f"completed in pass {index} after restart, {elapsed:.1f}s"
    print(f"{point.id}: {COVERED[point.id]}")
