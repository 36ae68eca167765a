"""Edges a code review found (review 8): lost leases, clock skew, stale states, lock-out."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
import structlog.testing

from rotator import engine, errors, model
from tests.unit.fakes import Crash, FakeLock, InvariantBroken
from tests.unit.test_engine import PATH, SPEC, World


def _iam_clock(w: World, skew: timedelta) -> None:
    """IAM's clock runs ``skew`` off rotator's and dates keys at whole seconds."""
    real = w.iam.create_key

    def create(user: str) -> model.NewKey:
        new = real(user)
        key = w.iam._find(user, new.key_id)
        key.created = model.whole_seconds(key.created + skew)  # ready_at stays real time
        return model.NewKey(new.key_id, new.secret, key.created)

    w.iam.create_key = create  # type: ignore[method-assign]


def _run(w: World, **kw: bool) -> model.PassReport:
    try:
        return w.run(**kw)
    except InvariantBroken as broken:
        pytest.fail(f"invariant broken: {broken}")


# --- F1: verify_timeout is counted from IAM's create date -----------------------------------


def test_an_iam_clock_a_minute_behind_does_not_cut_verify_timeout_short() -> None:
    # A key needing 40 s to propagate is published at the 70 s attempt with synchronised
    # clocks (0, 10, 30, 70 s: within the 2 min verify_timeout). With IAM's clock 60 s behind,
    # the key looks 60 s old at birth: given up after 30 s, every time.
    w = World()
    w.iam.propagation = timedelta(seconds=40)
    _iam_clock(w, -timedelta(seconds=60))
    results = []
    for _ in range(3):
        report = _run(w)
        results.append(report.rotated)
        retry = w.state().retry_after
        if retry is not None:
            w.clock.t = retry
    assert results[0], f"rotated per pass: {results}; last error: {w.state().last_error}"


# --- F2: a pending key verified in an earlier pass is published without a look at IAM ------


def test_a_verified_pending_key_made_inactive_before_its_publish_is_not_published() -> None:
    w = World()
    _run(w)
    first = w.vault.published_id(PATH)
    w.clock.advance(minutes=10)
    real = w.vault.write_published

    def flaky(*args: object, **kwargs: object) -> model.Published:
        raise errors.VaultUnavailable("503 on the publish only")

    w.vault.write_published = flaky  # type: ignore[assignment,method-assign]
    assert not _run(w).ok
    pending = w.state().pending
    assert pending is not None and pending.verified_at is not None
    w.vault.write_published = real  # type: ignore[method-assign]
    # someone (incident response) deactivates the fresh key before the next pass
    w.iam._find("watcher_1", pending.key_id).status = model.KeyStatus.INACTIVE
    w.clock.advance(seconds=30)
    report = _run(w)
    assert w.published_works(), (
        f"published {w.vault.published_id(PATH)} (Inactive); before: {first}"
    )
    assert w.vault.published_id(PATH) not in (first, pending.key_id) and report.rotated
    assert pending.key_id not in [k.key_id for k in w.iam.keys_of("watcher_1")]  # deleted
    assert any("pending key was made Inactive" in a for a in report.actions)


# --- F3: a lease lost during a verification call does not stop the give-up's delete --------


def test_a_lease_lost_during_the_last_verification_deletes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = World()
    lock = FakeLock(w.clock)
    a = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-a")
    b = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-b")
    w.engine = a
    _run(w)
    w.clock.advance(minutes=10)
    w.iam.propagation = timedelta(seconds=72)  # ready just after the 4th (last) attempt at 70 s
    leases: list[engine._Lease] = []

    class Recorded(engine._Lease):
        def __init__(self, target: str, ttl: float) -> None:
            super().__init__(target, ttl)
            leases.append(self)

    monkeypatch.setattr(engine, "_Lease", Recorded)
    real_verify = w.iam.verify_key
    calls = {"n": 0}

    def slow_verify(key_id: str, secret: model.Secret) -> model.VerifyResult:
        calls["n"] += 1
        result = real_verify(key_id, secret)
        if calls["n"] == 4:  # A's last attempt: IAM answers slowly; A's Vault is cut off
            leases[-1].lost.set()  # A's renewals fail
            w.clock.advance(seconds=16)  # A's lease expires; B takes the target over
            w.iam.verify_key = real_verify  # type: ignore[method-assign]
            report_b = b.run_pass(SPEC)
            assert report_b.rotated, report_b
        return result  # A's own answer: NOT_YET (the key was not ready when asked)

    w.iam.verify_key = slow_verify  # type: ignore[method-assign]
    try:
        a.run_pass(SPEC)
    except InvariantBroken as broken:
        pytest.fail(f"replica A acted after losing its lease: {broken}")
    assert w.published_works()


# --- F4: published secret deleted during a grace period: blocked for ever, false ETA --------


def test_a_secret_deleted_in_a_grace_period_is_replaced_once_the_slot_frees() -> None:
    w = World()
    _run(w)
    first = w.vault.published_id(PATH)
    w.clock.advance(minutes=10)
    assert _run(w).rotated  # K2 published, K1 retiring (grace 2 min, then 2 min Inactive)
    second = w.vault.published_id(PATH)
    w.vault.by_hand(PATH, None)  # `kv delete`: the latest version, which held K2, is deleted
    w.clock.advance(seconds=30)
    reason = _run(w).blocked_reason or ""
    for _ in range(40):  # 20 min: K1's grace and inactive period are long over
        w.clock.advance(seconds=30)
        report = _run(w)
    statuses = {k.key_id: k.status.value for k in w.iam.keys_of("watcher_1")}
    assert w.vault.published_id(PATH) not in (None, first, second), (
        f"still blocked: {report.blocked_reason}\nkeys: {statuses}\nfirst reason: {reason}"
    )


# --- F5: a state rolled back to a pending version re-publishes a retiring key --------------


def rolled_back_to_pending(w: World) -> tuple[str, str, Any]:
    """The state rolled back by hand (`kv rollback`) to the version with K2 pending while K3 is
    published and K2 in its grace. Returns (K2, K3, the latest state document before)."""
    docs: list[dict[str, Any]] = []
    real = w.vault.write_state

    def recorded(target: str, state: model.TargetState, version: int) -> int:
        docs.append(state.to_document())
        return real(target, state, version)

    w.vault.write_state = recorded  # type: ignore[method-assign]
    _run(w)
    w.clock.advance(minutes=10)
    _run(w)
    k2 = w.vault.published_id(PATH)
    pending_version = [d for d in docs if d["pending"] and d["pending"]["key_id"] == k2][-1]
    for _ in range(10):  # K1 retires and goes
        w.clock.advance(seconds=30)
        _run(w)
    w.clock.advance(minutes=6)
    _run(w)
    k3 = w.vault.published_id(PATH)  # K3 published, K2 in its grace
    assert k2 is not None and k3 is not None and k2 != k3
    latest = w.vault.states[SPEC.name]
    w.vault.states[SPEC.name] = dataclasses.replace(
        latest, data=pending_version, version=latest.version + 1
    )
    return k2, k3, latest


def test_a_state_rolled_back_to_an_old_pending_version_does_not_republish_a_retiring_key() -> None:
    w = World()
    _, k3, latest = rolled_back_to_pending(w)
    w.clock.advance(seconds=30)
    report = _run(w)
    assert w.vault.published_id(PATH) == k3, (
        f"consumers switched back from {k3} to the retiring {w.vault.published_id(PATH)}; "
        f"{k3} is now foreign: {w.run().blocked_reason}"
    )
    assert not report.ok and "vault" in report.error_components
    assert "looks rolled back" in (report.error or "") and "kv rollback" in (report.error or "")
    assert w.iam._find("watcher_1", k3).status is model.KeyStatus.ACTIVE
    # the operator puts the latest state back: the target goes on from there
    w.vault.states[SPEC.name] = dataclasses.replace(latest, version=latest.version + 2)
    w.clock.advance(seconds=30)
    assert _run(w).ok and w.vault.published_id(PATH) == k3 and w.published_works()


# --- F6: a key made by hand within 5 min of an interrupted create is deleted ---------------


def test_a_key_made_by_hand_minutes_after_a_crash_before_create_is_held_and_released() -> None:
    # rotator is killed after its intent marker, before CreateAccessKey; an operator makes a key
    # by hand minutes later. It cannot be told from the crash's orphan (EIM has no
    # GetAccessKeyLastUsed): it is made Inactive, not deleted, and said so; made Active again,
    # it is the operator's and rotator leaves it alone for good.
    w = World()
    _run(w)
    w.clock.advance(minutes=10)
    real = w.iam.create_key

    def killed(user: str) -> model.NewKey:
        raise Crash("kill -9 before CreateAccessKey was sent")

    w.iam.create_key = killed  # type: ignore[method-assign]
    with pytest.raises(Crash):
        w.run()
    assert w.state().intent is not None
    w.iam.create_key = real  # type: ignore[method-assign]
    w.clock.advance(minutes=3)  # rotator is down; meanwhile an operator makes a key by hand
    hand = w.iam.add_foreign_key("watcher_1")
    w.iam._find("watcher_1", hand).foreign = False  # the fake: rotator may deactivate this one
    w.restart()
    with structlog.testing.capture_logs() as logs:
        _run(w)

    assert w.iam._find("watcher_1", hand).status is model.KeyStatus.INACTIVE  # not deleted
    said = [e for e in logs if e["event"] == "key_quarantined"]
    assert (
        len(said) == 1 and said[0]["key_id"] == hand and "make it Active again" in said[0]["note"]
    )
    assert said[0]["log_level"] == "warning"
    w.iam._find("watcher_1", hand).status = model.KeyStatus.ACTIVE  # the operator's fix
    w.iam._find("watcher_1", hand).foreign = True  # from now on rotator must never touch it
    w.clock.advance(seconds=30)
    assert any(a.startswith("release_orphan") for a in _run(w).actions)
    w.clock.advance(seconds=30)
    report = _run(w)
    assert report.foreign_keys == 1  # a foreign key from now on, taking the second slot
    assert report.blocked and f"foreign {hand}" in (report.blocked_reason or "")
    for _ in range(20):  # 10 min: past any hold; the key stays, Active
        w.clock.advance(seconds=30)
        _run(w)
    assert w.iam._find("watcher_1", hand).status is model.KeyStatus.ACTIVE
    assert w.published_works()


# --- F7: a crash after a verification attempt forgets it: the lock-out schedule breaks -----


@pytest.mark.parametrize("lost", [1, 4], ids=["first attempt", "fourth attempt"])
def test_a_crash_in_a_verification_attempt_keeps_the_lockout_schedule(lost: int) -> None:
    # the attempt the crash interrupted is not in the state's count: counted from there,
    # rotator's 4th attempt would be OUTSCALE's 5th failure, inside the block (the 4th: the 5th
    # attempt came 0 s after it, inside the block)
    policy = dataclasses.replace(SPEC.policy, verify_timeout=timedelta(minutes=8))
    w = World(dataclasses.replace(SPEC, policy=policy))
    w.iam.propagation = timedelta(minutes=5)
    real = w.iam.verify_key
    failures: list[float] = []

    def verify(key_id: str, secret: model.Secret) -> model.VerifyResult:
        result = real(key_id, secret)
        failures.append((w.clock.now() - w.iam._find("watcher_1", key_id).created).total_seconds())
        if len(failures) == lost:
            raise Crash("kill -9 in the attempt, before its count was written")
        return result

    w.iam.verify_key = verify  # type: ignore[method-assign]
    with pytest.raises(Crash):
        w.run()
    assert w.state().pending is not None and w.state().pending.attempts == lost - 1  # type: ignore[union-attr]
    w.restart()
    assert _run(w).rotated
    for n in range(4, len(failures), 4):  # after each 4th failure in a row, the 1 min+ block
        assert failures[n] - failures[n - 1] >= 60, f"attempts at {failures} s"


# --- F8: the fresh listing before the intent is not checked against max_keys ---------------


def test_a_key_made_by_hand_while_the_pass_waited_for_its_lease_is_not_exceeded() -> None:
    w = World()
    w.iam.quota = 3  # EIM's per-user quota may exceed max_keys (2)
    lock = FakeLock(w.clock)
    w.engine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="a")
    _run(w)
    w.clock.advance(minutes=10)
    real_acquire = lock.acquire

    def slow_acquire(target: str, holder: str, ttl: float) -> model.Grant | None:
        lock.acquire = real_acquire  # type: ignore[method-assign]
        w.clock.advance(seconds=2)  # a slow Vault
        w.iam.add_foreign_key("watcher_1")  # meanwhile someone makes a key
        return real_acquire(target, holder, ttl)

    lock.acquire = slow_acquire  # type: ignore[method-assign]
    report = _run(w)
    assert len(w.iam.keys_of("watcher_1")) <= 2 and report.blocked


# --- F9: schema true (or 1.0) passes for schema 1 ------------------------------------------


@pytest.mark.parametrize("schema", [True, 1.0])
def test_a_schema_that_is_not_the_integer_1_is_refused(schema: object) -> None:
    doc = {**model.TargetState().to_document(), "schema": schema}
    with pytest.raises(errors.StateSchemaError):
        model.TargetState.from_document(doc)


# --- a lease not renewed for most of its TTL counts as lost (the renewer itself stuck) ------


def test_a_lease_whose_renewals_stopped_coming_stops_the_pass_before_its_next_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the renewer is stuck on a renewal call that does not come back: ``lost`` is never set,
    # but another replica takes the lease once it expires in Vault
    w = World()
    lock = FakeLock(w.clock)
    w.engine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="a", lock_ttl=15.0)
    _run(w)
    w.clock.advance(minutes=10)
    offset = {"s": 0.0}
    real_monotonic = engine.time.monotonic
    monkeypatch.setattr(engine.time, "monotonic", lambda: real_monotonic() + offset["s"])
    monkeypatch.setattr(engine._Renewer, "add", lambda self, lease: None)  # no renewal comes
    real_verify = w.iam.verify_key

    def slow_verify(key_id: str, secret: model.Secret) -> model.VerifyResult:
        offset["s"] += 13.0  # 13 s of a 15 s TTL without a renewal
        return real_verify(key_id, secret)

    w.iam.verify_key = slow_verify  # type: ignore[method-assign]
    before = w.vault.published_id(PATH)
    report = _run(w)

    assert not report.ok and "lost the lock" in (report.error or "")
    assert w.vault.published_id(PATH) == before  # stopped before publishing


def test_adopting_a_held_orphan_retires_it_as_an_adopted_key() -> None:
    # `adopt` answered "already managed" for a held orphan, which was then deleted at the end of
    # its hold, not through the inactive period adopt promises
    w = World()
    _run(w)
    w.clock.advance(minutes=10)
    w.iam.crash.at = w.iam.crash.calls + 1  # the intent write, then CreateAccessKey
    w.iam.crash.after_apply = True
    with pytest.raises(Crash):
        w.run()
    orphan = next(
        k.key_id for k in w.iam.keys_of("watcher_1") if k.key_id != w.vault.published_id(PATH)
    )
    w.restart()
    w.clock.advance(seconds=30)
    _run(w)
    assert [r.orphan for r in w.state().retiring if r.key_id == orphan] == [True]
    held = [(k, phase) for k, phase, _ in w.engine.status(SPEC).retiring if k == orphan]
    assert held == [(orphan, engine.RetiringPhase.HELD)]  # status says it is held, not retiring

    assert "adopted" in w.engine.adopt(SPEC, orphan)

    adopted = [r for r in w.state().retiring if r.key_id == orphan]
    assert len(adopted) == 1 and not adopted[0].orphan
    assert adopted[0].delete_at == w.clock.now() + SPEC.policy.inactive_period
