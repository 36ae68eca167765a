"""The engine over in-memory fakes with an explicit clock: whole rotations, crashes, faults."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
import structlog.testing

from rotator import engine, errors, identity, model, rotation
from tests.unit.fakes import Crash, FakeClock, FakeIAM, FakeLock, FakeVault

PATH = "monitoring/watcher_1"
DOC = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"}],
}
POLICY = rotation.Policy(
    max_age=timedelta(minutes=10),
    grace=timedelta(minutes=2),
    inactive_period=timedelta(minutes=2),
    check_interval=timedelta(seconds=30),
    verify_timeout=timedelta(minutes=2),
)
SPEC = engine.TargetSpec(
    name="monitoring",
    user="watcher_1",
    secret_path=PATH,
    policy=POLICY,
    desired=identity.Desired(
        user="watcher_1",
        group="monitoring",
        policy=identity.WantedPolicy("monitoring", DOC, "Allow describe for every item"),
    ),
)


class World:
    def __init__(self, spec: engine.TargetSpec = SPEC) -> None:
        self.spec = spec
        self.clock = FakeClock()
        self.iam = FakeIAM(self.clock, max_keys=spec.policy.max_keys)
        self.vault = FakeVault(self.iam)
        self.iam.published_id = lambda: self.vault.published_id(spec.secret_path)
        self.vault.crash = self.iam.crash
        self.engine = engine.Engine(self.iam, self.vault, self.clock)

    def run(self, *, force: bool = False) -> model.PassReport:
        return self.engine.run_pass(self.spec, force=force)

    def restart(self) -> None:
        """A new process: nothing in memory survives."""
        self.engine = engine.Engine(self.iam, self.vault, self.clock)

    def state(self) -> model.TargetState:
        return self.vault.read_state(self.spec.name).state

    def published_works(self) -> bool:
        pub = self.vault.published_secret(self.spec.secret_path)
        return pub is not None and self.iam.authenticates(*pub)


def test_first_pass_creates_the_identity_and_publishes_a_verified_key() -> None:
    w = World()
    report = w.run()
    assert report.ok and report.rotated
    assert w.iam.groups == {"monitoring": {"watcher_1"}}
    assert w.iam.group_policies == {"monitoring": {"monitoring"}}
    assert w.published_works()
    assert report.published_key_id == w.vault.published_id(PATH)
    assert report.keys_active == 1 and report.foreign_keys == 0


def test_idle_pass_makes_one_iam_call_and_writes_nothing() -> None:
    w = World()
    w.run()
    w.clock.advance(seconds=30)
    w.iam.calls.clear()
    writes = w.vault.writes
    report = w.run()
    assert report.ok and not report.rotated
    assert w.iam.calls == ["ListAccessKeys"]
    assert w.vault.writes == writes


def test_full_cycle_old_key_stays_active_for_grace_then_inactive_then_deleted() -> None:
    w = World()
    w.run()
    first = w.vault.published_id(PATH)
    w.clock.advance(minutes=10)
    assert w.run().rotated
    second = w.vault.published_id(PATH)
    assert second != first
    statuses = {k.key_id: k.status for k in w.iam.keys_of("watcher_1")}
    assert statuses == {first: model.KeyStatus.ACTIVE, second: model.KeyStatus.ACTIVE}
    w.clock.advance(minutes=2)
    w.run()
    statuses = {k.key_id: k.status for k in w.iam.keys_of("watcher_1")}
    assert statuses == {first: model.KeyStatus.INACTIVE, second: model.KeyStatus.ACTIVE}
    w.clock.advance(minutes=2)
    w.run()
    assert [k.key_id for k in w.iam.keys_of("watcher_1")] == [second]
    assert w.published_works()


def test_a_retiring_key_iam_stops_listing_then_lists_again_is_left_alone_as_foreign() -> None:
    # IAM pointed at another account for a while, then back: the key consumers held is listed
    # again; taking it for an orphan of rotator's would delete it with no grace
    w = World()
    w.run()
    first = w.vault.published_id(PATH)
    w.clock.advance(minutes=10)
    assert w.run().rotated
    keys = w.iam.users["watcher_1"]
    [hidden] = [k for k in keys if k.key_id == first]
    keys.remove(hidden)
    w.clock.advance(seconds=30)
    w.run()
    assert w.state().retiring == () and first not in w.state().created_ids

    keys.append(hidden)
    w.clock.advance(seconds=30)
    with structlog.testing.capture_logs() as logs:
        report = w.run()

    assert first in [k.key_id for k in w.iam.keys_of("watcher_1")]
    assert hidden.status is model.KeyStatus.ACTIVE
    assert report.foreign_keys == 1
    assert not [e for e in logs if e["event"] in ("key_deleted", "key_deactivated")]


def test_with_the_published_key_made_inactive_by_hand_the_retiring_key_stays_active() -> None:
    w = World()
    w.run()
    first = w.vault.published_id(PATH)
    w.clock.advance(minutes=10)
    assert w.run().rotated
    second = w.vault.published_id(PATH)
    assert second is not None
    w.iam._find("watcher_1", second).status = model.KeyStatus.INACTIVE  # by hand
    w.clock.advance(minutes=2)  # past the retiring key's grace

    report = w.run()

    assert w.iam._find("watcher_1", first).status is model.KeyStatus.ACTIVE  # the last working
    assert report.blocked and report.blocked_reason is not None
    assert f"the published key {second} is Inactive" in report.blocked_reason
    # the operator deletes the Inactive key: a new key is published, then the old one retires
    w.iam.users["watcher_1"].remove(w.iam._find("watcher_1", second))
    assert w.run().rotated and w.published_works()
    w.run()
    assert w.iam._find("watcher_1", first).status is model.KeyStatus.INACTIVE


def test_a_retiring_key_made_active_again_by_hand_gets_a_new_grace_not_deactivated() -> None:
    # the runbook's roll-back: make the Inactive previous key Active, then restore it in Vault
    w = World()
    w.run()
    first = w.vault.published_id(PATH)
    w.clock.advance(minutes=10)
    w.run()
    w.clock.advance(minutes=2)
    w.run()
    hand = w.iam._find("watcher_1", first)
    assert hand.status is model.KeyStatus.INACTIVE
    hand.status = model.KeyStatus.ACTIVE  # by hand
    w.clock.advance(seconds=30)

    with structlog.testing.capture_logs() as logs:
        w.run()

    assert hand.status is model.KeyStatus.ACTIVE
    [retiring] = w.state().retiring
    assert retiring.deactivated_at is None
    assert retiring.retire_at == w.clock.now() + POLICY.grace
    assert [e["key_id"] for e in logs if e["event"] == "key_reactivated"] == [first]
    w.clock.advance(seconds=30)
    w.run()
    assert hand.status is model.KeyStatus.ACTIVE  # still in its new grace
    w.clock.advance(minutes=2)
    w.run()
    assert hand.status is model.KeyStatus.INACTIVE  # then retired as before


def test_key_still_propagating_is_published_once_it_authenticates() -> None:
    w = World()
    w.iam.propagation = timedelta(seconds=15)
    report = w.run()
    assert report.rotated and w.published_works()
    attempts = list(w.iam.verify_attempts.values())
    assert attempts == [3]  # at 0 s, 10 s and 30 s: never four failures in a row


def test_key_that_never_verifies_is_deleted_counted_and_retried_later() -> None:
    w = World()
    w.iam.break_next_keys = 1
    report = w.run()
    assert report.rotation_failed and not report.ok
    assert "verify" in report.error_components
    assert w.iam.keys_of("watcher_1") == []
    assert w.vault.published_id(PATH) is None
    assert w.state().retry_after is not None
    w.clock.t = w.state().retry_after  # type: ignore[assignment]
    assert w.run().rotated and w.published_works()


def test_a_rotation_given_up_backs_off_but_the_key_stays_due_by_its_age() -> None:
    w = World()
    w.run()
    current = w.state().current
    assert current is not None
    w.clock.t = current.created + POLICY.max_age  # due
    w.iam.break_next_keys = 1

    report = w.run()

    assert report.rotation_failed
    assert report.next_due == w.state().retry_after and report.next_due > w.clock.t
    assert report.due_by_age == current.created + POLICY.max_age  # what the metric shows


def test_a_rotation_whose_promotion_write_is_lost_is_counted_once_and_never_as_failed() -> None:
    # another writer (`adopt`, a replica) wrote the state between the publish and the state
    # write: the pass failed on check-and-set and counted a rotation, and the next pass,
    # finishing it, counted it again (breaker c17)
    w = World()
    w.run()
    w.clock.advance(minutes=10)
    publish = w.vault.write_published

    def then_another_writer(path: str, key: model.NewKey, base: model.Published) -> model.Published:
        written = publish(path, key, base)
        stored = w.vault.read_state("monitoring")
        w.vault.write_state("monitoring", stored.state, stored.version)
        return written

    w.vault.write_published = then_another_writer  # type: ignore[method-assign]
    lost = w.run()
    w.vault.write_published = publish  # type: ignore[method-assign]
    finished = w.run()

    assert not lost.ok and "vault" in lost.error_components
    assert not lost.rotated and not lost.rotation_failed
    assert finished.rotated and finished.ok
    assert any(a.startswith("promote_pending") for a in finished.actions)
    assert w.published_works()


def test_vault_down_means_no_iam_change() -> None:
    w = World()
    w.vault.down = True
    report = w.run()
    assert not report.ok and report.error_components == ("vault",)
    assert w.iam.calls == []


@pytest.mark.parametrize(
    ("note", "said"),
    [
        (engine.RETRIED_BY_THE_DAEMON, "; retried on the next pass"),
        (engine.RETRIED_BY_HAND, "; transient: run the command again later"),
    ],
)
def test_a_transient_failure_says_what_becomes_of_it_and_a_permanent_one_does_not(
    note: str, said: str
) -> None:
    w = World()
    w.engine = engine.Engine(w.iam, w.vault, w.clock, retry_note=note)
    w.vault.down = True
    assert (w.run().error or "").endswith(said)
    w.vault.down = False
    w.iam.fail_next.append(errors.EimAccessDenied("ListAccessKeys: denied", code="AccessDenied"))
    denied = w.run().error or ""
    assert denied == "ListAccessKeys: denied"  # permanent: retrying it changes nothing


def test_status_with_iam_unreachable_shows_what_vault_holds_and_says_iam_was_not_read() -> None:
    w = World()
    w.run()
    w.clock.advance(minutes=10)
    w.run()  # a current key and a retiring one
    state = w.state()
    assert state.current is not None and len(state.retiring) == 1
    w.iam.fail_next.append(errors.EimTransientError("ListAccessKeys: could not reach EIM"))

    view = w.engine.status(SPEC)

    assert view.published_key_id == state.current.key_id == view.current_key_id
    assert view.retiring == ((state.retiring[0].key_id, engine.RetiringPhase.UNKNOWN, None),)
    assert view.last_error is not None and view.last_error.startswith("IAM not read")
    assert "could not reach EIM" in view.last_error
    assert view.due_reason is None and view.foreign == ()  # nothing claimed about IAM


def test_foreign_key_is_counted_and_left_alone_and_blocks_when_slots_run_out() -> None:
    w = World()
    w.iam.users["watcher_1"] = []
    hand = w.iam.add_foreign_key("watcher_1")
    report = w.run()
    assert report.rotated and report.foreign_keys == 1
    w.clock.advance(minutes=10)
    blocked = w.run()
    assert blocked.blocked and not blocked.ok
    assert blocked.blocked_reason is not None and hand in blocked.blocked_reason
    assert hand in [k.key_id for k in w.iam.keys_of("watcher_1")]


def test_adopted_foreign_key_is_retired_and_the_slot_freed() -> None:
    w = World()
    w.iam.users["watcher_1"] = []
    hand = w.iam.add_foreign_key("watcher_1")
    w.run()
    assert "adopted" in w.engine.adopt(SPEC, hand)
    w.iam._find("watcher_1", hand).foreign = False  # the operator handed it over
    w.clock.advance(minutes=2)
    w.run()
    w.clock.advance(minutes=2)
    w.run()
    assert hand not in [k.key_id for k in w.iam.keys_of("watcher_1")]


def test_adopt_over_a_state_written_meanwhile_reads_it_again_and_adopts() -> None:
    # a pass of the daemon wrote the state between adopt's read and its write: the adoption
    # was lost, and the message said "the next pass re-reads it" (no pass redoes an adopt)
    w = World()
    w.iam.users["watcher_1"] = []
    hand = w.iam.add_foreign_key("watcher_1")
    w.run()
    real = w.vault.write_state
    conflicts = {"left": 2}

    def busy(target: str, state: model.TargetState, version: int) -> int:
        if conflicts["left"]:
            conflicts["left"] -= 1
            stored = w.vault.read_state(target)
            real(target, stored.state.replace(failures=stored.state.failures), stored.version)
            raise errors.VaultConflict("the state changed since rotator read it")
        return real(target, state, version)

    w.vault.write_state = busy  # type: ignore[method-assign]
    assert "adopted" in w.engine.adopt(SPEC, hand)
    assert hand in [r.key_id for r in w.state().retiring]

    conflicts["left"] = 10  # never settles: said so, with what to do
    other = w.iam.add_foreign_key("watcher_1", status=model.KeyStatus.INACTIVE)
    with pytest.raises(errors.RotatorError) as failed:
        w.engine.adopt(SPEC, other)
    assert f"{other} was not adopted" in str(failed.value)
    assert "run `rotator adopt` again" in str(failed.value)
    assert "next pass" not in str(failed.value)


def test_adopt_refuses_a_key_another_targets_state_tracks() -> None:
    # a name reused after a rename: the key the other state publishes is not foreign to rotator
    w = World()
    w.run()
    key = w.vault.published_id(PATH)
    assert key is not None
    reused = dataclasses.replace(SPEC, name="monitor2", secret_path="m2/w1")

    with pytest.raises(errors.RotatorError) as refused:
        w.engine.adopt(reused, key, others=[SPEC, reused])

    assert f"key {key} is tracked by the state of target monitoring" in str(refused.value)
    assert w.vault.read_state("monitor2").version == 0  # nothing written


def published_hand_key(w: World) -> str:
    """A key made by hand and written to the target's secret, with no state for the target."""
    w.iam.users["watcher_1"] = []
    hand = w.iam.add_foreign_key("watcher_1")
    found = w.iam._find("watcher_1", hand)
    w.vault.write_published(
        PATH,
        model.NewKey(hand, model.Secret(found.secret), found.created),
        w.vault.read_published(PATH),
    )
    return hand


def test_a_first_pass_over_a_published_key_it_does_not_track_says_so_and_keeps_the_key() -> None:
    # also what a restart sees after vault.state_path or vault.mount changed: no state here
    w = World()
    hand = published_hand_key(w)
    before = w.engine.status(SPEC)

    with structlog.testing.capture_logs() as logs:
        report = w.run()

    assert before.last_error is not None and f"holds {hand}" in before.last_error
    assert (
        "vault.state_path" in before.last_error and f"adopt monitoring {hand}" in before.last_error
    )
    warned = [e for e in logs if e["event"] == "published_key_untracked"]
    assert [e["key_id"] for e in warned] == [hand]
    assert "vault.state_path changed" in warned[0]["note"]
    assert report.rotated and w.vault.published_id(PATH) != hand
    assert w.iam._find("watcher_1", hand).status is model.KeyStatus.ACTIVE
    assert report.foreign_keys == 1
    assert w.engine.status(SPEC).last_error is None  # said once: the target tracks its key now


def test_a_state_path_changed_then_put_back_recovers_by_adopting_the_key_published_meanwhile() -> (
    None
):
    w = World()
    w.run()
    w.clock.advance(minutes=10)
    w.run()
    for _ in range(2):
        w.clock.advance(minutes=3)
        w.run()
    assert len(w.iam.keys_of("watcher_1")) == 1  # the previous key retired and deleted
    old_key = w.vault.published_id(PATH)
    old = w.vault.states.pop(SPEC.name)  # a restart with another vault.state_path
    w.restart()
    assert w.run().rotated  # warned (above), a key of the new state's own published
    meanwhile = w.vault.published_id(PATH)
    assert meanwhile is not None and w.published_works()
    moved = w.vault.states.pop(SPEC.name)
    w.vault.states[SPEC.name] = dataclasses.replace(old, version=moved.version)  # put back
    w.restart()
    assert w.run().foreign_keys == 1
    w.clock.advance(minutes=10)
    blocked = w.run()  # the old state's key is due, but the one published meanwhile holds a slot
    assert blocked.blocked_reason is not None and f"foreign {meanwhile}" in blocked.blocked_reason

    w.engine.adopt(SPEC, meanwhile)  # what the runbook says for this case
    w.iam._find("watcher_1", meanwhile).foreign = False
    for _ in range(6):
        report = w.run()
        assert report.ok or report.blocked_reason is not None, report.error
        assert w.published_works()
        w.clock.advance(minutes=4)

    left = [k.key_id for k in w.iam.keys_of("watcher_1")]
    assert old_key not in left  # the old state's key retired through grace, Inactive, deletion
    assert report.foreign_keys == 0


def test_a_target_with_a_state_is_not_warned_of_an_untracked_published_key() -> None:
    w = World()
    w.run()
    w.clock.advance(minutes=10)
    with structlog.testing.capture_logs() as logs:
        assert w.run().rotated
    assert not [e for e in logs if e["event"] == "published_key_untracked"]


def test_tracked_by_names_the_state_that_tracks_each_key_across_targets() -> None:
    w = World()
    w.run()
    key = w.vault.published_id(PATH)
    assert key is not None
    reused = dataclasses.replace(SPEC, name="monitor2", secret_path="m2/w1")

    owners = w.engine.tracked_by([reused, SPEC])

    assert owners == {key: "monitoring"}


def adopted_published_hand_key() -> tuple[World, str]:
    """A migration: consumers read a hand-made key K from Vault and the operator adopts it; then
    longer than grace passes, so K's own retire_at is past (K is protected while published)."""
    w = World()
    hand = published_hand_key(w)
    w.engine.adopt(SPEC, hand)
    w.iam._find("watcher_1", hand).foreign = False  # the operator handed it over
    w.clock.advance(minutes=3)
    return w, hand


def test_an_adopted_key_that_was_published_stays_active_a_full_grace_after_replacement() -> None:
    w, hand = adopted_published_hand_key()

    w.run()  # the first key of rotator's own is published: K is replaced now
    replaced_at = w.clock.now()
    w.clock.advance(seconds=30)
    w.run()

    assert w.vault.published_id(PATH) != hand
    assert w.iam._find("watcher_1", hand).status is model.KeyStatus.ACTIVE  # grace from now
    left = POLICY.grace - (w.clock.now() - replaced_at)
    w.clock.advance(seconds=left.total_seconds() + 1)
    w.run()
    assert w.iam._find("watcher_1", hand).status is model.KeyStatus.INACTIVE


def test_the_replaced_key_gets_its_grace_also_when_a_crash_followed_the_publish() -> None:
    # As above, but the process dies between the publish and the state write: the next pass
    # finishes the promotion from the stored pending key, which names the key it replaced.
    w, hand = adopted_published_hand_key()
    real = w.vault.write_state

    def crash_on_promotion(target: str, state: model.TargetState, version: int) -> int:
        if state.current is not None:
            w.vault.write_state = real  # type: ignore[method-assign]
            raise Crash("killed after the publish")
        return real(target, state, version)

    w.vault.write_state = crash_on_promotion  # type: ignore[method-assign]
    with pytest.raises(Crash):
        w.run()
    assert w.vault.published_id(PATH) != hand
    published_at = w.clock.now()
    w.restart()
    w.clock.advance(seconds=30)
    w.run()  # finishes the promotion

    assert w.state().current is not None and w.state().current.key_id != hand
    assert w.iam._find("watcher_1", hand).status is model.KeyStatus.ACTIVE
    left = POLICY.grace - (w.clock.now() - published_at)
    w.clock.advance(seconds=left.total_seconds() + 31)
    w.run()
    assert w.iam._find("watcher_1", hand).status is model.KeyStatus.INACTIVE


def test_a_target_moved_to_another_user_stops_with_a_clear_error_and_touches_nothing() -> None:
    w = World()
    w.run()
    old_keys = {k.key_id: k.status for k in w.iam.keys_of("watcher_1")}
    moved = dataclasses.replace(SPEC, user="watcher_2", desired=None)
    w.iam.users["watcher_2"] = []
    w.clock.advance(seconds=30)

    report = w.engine.run_pass(moved)
    view = w.engine.status(moved)

    assert not report.ok and "config" in report.error_components
    assert report.error is not None
    assert "belong to user watcher_1, the config now says watcher_2" in report.error
    assert "put user: watcher_1 back" in report.error
    assert "`kv metadata delete`" in report.error  # `kv delete` leaves a deleted state, refused
    assert view.last_error is not None and "belong to user watcher_1" in view.last_error
    # status shows the keys the state tracks, not "the current key is gone" of the new user
    assert view.due_reason is None and [k.key_id for k in view.keys] == list(old_keys)
    assert {k.key_id: k.status for k in w.iam.keys_of("watcher_1")} == old_keys
    assert w.iam.keys_of("watcher_2") == []
    assert w.state().user == "watcher_1"


def test_credentials_of_another_account_change_nothing_there_and_publish_nothing() -> None:
    # eim.endpoint, eim.region or the credentials file pointed at another account: the user
    # and its keys look gone, and a pass would make them there and publish over the working key
    w = World()
    w.run()
    assert w.state().account == "123456789012"
    published = w.vault.published_id(PATH)
    ours = w.iam.users
    w.iam.users, w.iam.account_id = {}, "222222222222"  # another account: no such user
    w.clock.advance(seconds=30)

    report = w.run()

    assert not report.ok and "config" in report.error_components
    assert report.error is not None
    assert "made in IAM account 123456789012" in report.error
    assert "now act in account 222222222222" in report.error
    assert "`kv metadata delete`" in report.error
    assert w.iam.users == {} and w.vault.published_id(PATH) == published
    view = w.engine.status(SPEC)
    assert view.last_error is not None and "now act in account 222222222222" in view.last_error
    w.iam.users, w.iam.account_id = ours, "123456789012"  # put back
    assert w.run().ok and w.vault.published_id(PATH) == published and w.published_works()


def test_a_target_with_nothing_tracked_may_move_to_another_user() -> None:
    w = World()
    w.vault.write_state(SPEC.name, model.TargetState(user="watcher_0"), 0)
    assert w.run().ok
    assert w.state().user == "watcher_1" and w.state().current is not None


def test_a_secret_rolled_back_to_the_retiring_key_recovers_instead_of_blocking_for_ever() -> None:
    w = World()
    w.run()
    first = w.state().current
    assert first is not None
    w.clock.advance(minutes=10)
    w.run()  # rotated: the first key retires
    second = w.vault.published_id(PATH)
    old = w.iam._find("watcher_1", first.key_id)
    w.vault.write_published(  # the operator restores the previous version of the secret
        PATH,
        model.NewKey(old.key_id, model.Secret(old.secret), old.created),
        w.vault.read_published(PATH),
    )
    w.clock.advance(seconds=30)

    report = w.run()

    assert any(a.startswith("reinstate " + first.key_id) for a in report.actions), report
    assert w.state().current is not None and w.state().current.key_id == first.key_id
    assert [r.key_id for r in w.state().retiring] == [second]
    for _ in range(12):  # grace and inactive period of the second key, then a new rotation
        w.clock.advance(seconds=30)
        w.run()
    published = w.vault.published_id(PATH)
    assert published not in (first.key_id, second) and w.published_works()
    assert w.state().current is not None and w.state().current.key_id == published


NEW_PATH = "monitoring/watcher_1-v2"


def moved(w: World, path: str) -> engine.TargetSpec:
    """The target's config with another secret_path, from now on (the fake IAM's guard too)."""
    w.spec = dataclasses.replace(w.spec, secret_path=path)
    w.iam.published_id = lambda: w.vault.published_id(path)
    return w.spec


def test_a_changed_secret_path_gets_the_current_key_verified_and_no_new_key() -> None:
    w = World()
    w.run()
    key = w.vault.published_id(PATH)
    moved(w, NEW_PATH)
    w.clock.advance(seconds=30)
    w.iam.calls.clear()

    with structlog.testing.capture_logs() as logs:
        report = w.run()

    assert report.ok and not report.rotated
    assert w.vault.published_id(NEW_PATH) == key and w.published_works()
    assert w.vault.published_id(PATH) == key  # the old path is left as it was
    assert [k.key_id for k in w.iam.keys_of("watcher_1")] == [key]  # no key made
    assert w.iam.calls == ["ListAccessKeys", "Verify"]  # the copy is verified; no key made
    assert w.state().secret_path == NEW_PATH
    [warning] = [e for e in logs if e["event"] == "secret_path_changed"]
    assert warning["old_path"] == PATH and warning["copied"] is True
    assert any(a.startswith(f"move_secret {key}") for a in report.actions)
    w.clock.advance(seconds=30)
    with structlog.testing.capture_logs() as logs:
        assert w.run().ok
    assert not [e for e in logs if e["event"] == "secret_path_changed"]  # once


def test_a_changed_secret_path_whose_old_path_lost_the_key_gets_a_fresh_key_and_a_grace() -> None:
    w = World()
    w.run()
    first = w.vault.published_id(PATH)
    del w.vault.published[PATH]  # the old path was emptied by hand
    moved(w, NEW_PATH)
    w.clock.advance(seconds=30)

    report = w.run()

    assert report.ok and report.rotated
    second = w.vault.published_id(NEW_PATH)
    assert second not in (None, first) and w.published_works()
    assert w.iam._find("watcher_1", first).status is model.KeyStatus.ACTIVE  # in grace
    assert w.state().secret_path == NEW_PATH


def test_a_secret_path_moved_back_to_a_path_holding_an_inactive_key_gets_the_current_key() -> None:
    # At A the key K1; the path moves to B (K1 copied); a rotation publishes K2 at B and K1
    # retires to Inactive; the path moves back to A, which still holds K1: consumers of A fail.
    w = World()
    w.run()
    k1 = w.vault.published_id(PATH)
    moved(w, NEW_PATH)
    w.clock.advance(minutes=10)
    w.run()  # the move, then the rotation (max_age)
    k2 = w.vault.published_id(NEW_PATH)
    w.clock.advance(minutes=2, seconds=30)
    w.run()
    assert w.iam._find("watcher_1", k1).status is model.KeyStatus.INACTIVE
    assert w.vault.published_id(PATH) == k1

    moved(w, PATH)
    w.clock.advance(seconds=30)
    report = w.run()

    assert report.ok
    assert w.vault.published_id(PATH) == k2 and w.published_works()
    assert w.state().secret_path == PATH


def test_a_published_secret_rolled_back_to_an_inactive_key_gets_a_fresh_key() -> None:
    w = World(dataclasses.replace(SPEC, policy=dataclasses.replace(POLICY, max_keys=3)))
    w.iam.quota = 3  # a slot for the fresh key beside the current and the Inactive one
    w.run()
    first = w.vault.published_id(PATH)
    w.clock.advance(minutes=10)
    w.run()
    w.clock.advance(minutes=2, seconds=30)
    w.run()
    old = w.iam._find("watcher_1", first)
    assert old.status is model.KeyStatus.INACTIVE
    doc = w.vault.published[PATH]  # a KV rollback to the version holding the retired key
    doc.data.update(access_key_id=first, secret_access_key=old.secret)
    doc.version += 1
    w.clock.advance(seconds=30)

    report = w.run()

    assert report.ok and report.rotated, report
    assert any("the published secret holds an Inactive key" in a for a in report.actions)
    assert w.vault.published_id(PATH) not in (None, first) and w.published_works()


def rotated_twice_over(w: World) -> tuple[str, str]:
    """A rotation: the (retiring, current) keys, both Active, the two slots taken."""
    w.run()
    old = w.vault.published_id(PATH)
    w.clock.advance(minutes=10)
    assert w.run().rotated
    current = w.vault.published_id(PATH)
    assert old is not None and current is not None and old != current
    return old, current


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda data: data.pop("secret_access_key"), id="secret removed"),
        pytest.param(lambda data: data.update(secret_access_key=""), id="secret emptied"),
        pytest.param(lambda data: data.update(secret_access_key=7), id="secret not a string"),
        pytest.param(lambda data: data.update(secret_access_key="x" * 40), id="another secret"),
    ],
)
def test_a_published_secret_edited_to_an_unusable_secret_of_the_current_key_is_replaced(
    edit: Callable[[dict[str, object]], object],
) -> None:
    # its key id still the current key's, every pass said ok for ever (breaker case03) while
    # consumers could not sign: a fresh verified key is published, the current one retires
    w = World()
    w.run()
    current = w.vault.published_id(PATH)
    data = dict(w.vault.published[PATH].data)
    edit(data)
    w.vault.by_hand(PATH, data)
    w.clock.advance(seconds=30)
    assert not w.published_works()

    with structlog.testing.capture_logs() as logs:
        report = w.run()

    assert report.ok and report.rotated, report
    assert w.published_works() and w.vault.published_id(PATH) != current
    assert [r.key_id for r in w.state().retiring] == [current]  # a full grace, as a rotation
    [said] = [e for e in logs if e["event"] == "published_secret_broken"]
    assert said["key_id"] == current and "consumers cannot sign" in said["problem"]
    assert "x" * 40 not in repr(logs) + repr(report)
    w.clock.advance(seconds=30)
    assert not w.run().rotated  # and then it rests


def test_a_published_secret_edited_to_another_secret_while_no_slot_is_free_is_restored() -> None:
    w = World()
    _, current = rotated_twice_over(w)
    before = w.vault.published[PATH]
    w.vault.by_hand(PATH, {**before.data, "secret_access_key": "y" * 40})
    w.clock.advance(seconds=30)

    with structlog.testing.capture_logs() as logs:
        report = w.run()

    assert report.ok and not report.rotated, report
    assert w.vault.published_id(PATH) == current and w.published_works()
    assert [e["from_version"] for e in logs if e["event"] == "published_restored"] == [
        before.version
    ]


def test_a_secret_overwritten_with_a_wrong_key_while_no_slot_is_free_is_restored() -> None:
    # consumers fail on the overwritten secret, and with both slots taken no new key can be
    # made: the earlier version that holds the current key is verified and written back
    w = World()
    old, current = rotated_twice_over(w)
    before = w.vault.published[PATH]
    w.vault.by_hand(PATH, {**before.data, "access_key_id": "AKIAWRONG", "secret_access_key": "x"})
    w.clock.advance(seconds=30)
    assert not w.published_works()

    with structlog.testing.capture_logs() as logs:
        report = w.run()

    assert report.ok and not report.blocked and not report.rotated, report
    assert w.vault.published_id(PATH) == current and w.published_works()
    assert w.vault.published[PATH].version == before.version + 2  # written over, not rolled back
    assert w.vault.published_versions[PATH][before.version + 1]["access_key_id"] == "AKIAWRONG"
    assert any(a.startswith(f"restore_published {current}") for a in report.actions)
    restored = [e for e in logs if e["event"] == "published_restored"]
    assert len(restored) == 1 and restored[0]["from_version"] == before.version
    assert restored[0]["replaced_key_id"] == "AKIAWRONG"
    keys = {k.key_id: k.status for k in w.iam.keys_of("watcher_1")}
    assert keys == {old: model.KeyStatus.ACTIVE, current: model.KeyStatus.ACTIVE}  # no key made
    published = w.vault.published_secret(PATH)
    assert published is not None and published[1] not in repr(logs) + repr(report)


def test_a_deleted_secret_with_no_earlier_version_of_the_current_key_stays_blocked() -> None:
    # the version holding the current key is the deleted one: nothing to restore from (rotator
    # may not undelete); blocked, and the history is looked through once, not every pass
    w = World()
    rotated_twice_over(w)
    w.vault.by_hand(PATH, None)  # a `kv delete` of the latest version
    w.clock.advance(seconds=30)

    first = w.run()
    attempts = dict(w.iam.verify_attempts)
    w.clock.advance(seconds=30)
    second = w.run()

    assert first.blocked and second.blocked
    assert first.blocked_reason is not None and "a new key is needed now" in first.blocked_reason
    assert w.iam.verify_attempts == attempts  # no version held the current key: none verified
    assert w.vault.published_id(PATH) is None


@pytest.mark.parametrize(
    ("digest", "attempts", "reason"),
    [
        # the state's digest of the secret it verified tells that version's secret apart
        # without a failed signature (OUTSCALE locks a key after four)
        (True, 1, "not the one rotator verified"),
        # a state an older rotator wrote has no digest: the version is verified (and fails) once
        (False, 2, "did not authenticate"),
    ],
    ids=["digest in state", "no digest in state"],
)
def test_a_restore_whose_secret_fails_is_said_and_not_tried_again_for_that_version(
    digest: bool, attempts: int, reason: str
) -> None:
    w = World()
    _, current = rotated_twice_over(w)
    if not digest:
        stored = w.vault.read_state("monitoring")
        assert stored.state.current is not None and stored.state.current.secret_digest
        undigested = dataclasses.replace(stored.state.current, secret_digest=None)
        w.vault.write_state("monitoring", stored.state.replace(current=undigested), stored.version)
    doc = w.vault.published[PATH]
    w.vault.published_versions[PATH][doc.version]["secret_access_key"] = "not-the-secret"
    w.vault.by_hand(PATH, {**doc.data, "access_key_id": "AKIAWRONG"})
    w.clock.advance(seconds=30)

    with structlog.testing.capture_logs() as logs:
        first = w.run()
        w.clock.advance(seconds=30)
        second = w.run()

    assert first.blocked and second.blocked
    assert w.iam.verify_attempts[current] == attempts  # its own verification, and any try
    said = [e for e in logs if e["event"] == "published_not_restored"]
    assert len(said) == 1 and said[0]["key_id"] == current
    assert reason in said[0]["reason"]
    assert w.vault.published_id(PATH) == "AKIAWRONG"  # nothing unverified is written


def test_a_secret_holding_another_key_of_the_user_is_not_restored_over() -> None:
    # a key of the user (a hand-made one published on purpose) is someone's choice: kept
    w = World(dataclasses.replace(SPEC, policy=dataclasses.replace(POLICY, max_keys=3)))
    w.iam.quota = 3
    rotated_twice_over(w)
    hand = w.iam.create_key("watcher_1")
    doc = w.vault.published[PATH]
    w.vault.by_hand(
        PATH,
        {**doc.data, "access_key_id": hand.key_id, "secret_access_key": hand.secret.reveal()},
    )
    w.clock.advance(seconds=30)

    report = w.run()

    assert w.vault.published_id(PATH) == hand.key_id
    assert not any(a.startswith("restore_published") for a in report.actions)


def configured_as(w: World, *specs: engine.TargetSpec) -> None:
    """A new process whose config names ``specs`` (and no other target)."""
    w.engine = engine.Engine(w.iam, w.vault, w.clock, configured=[s.name for s in specs])


def test_a_renamed_target_carries_its_state_on_and_makes_no_key() -> None:
    w = World()
    w.run()
    w.clock.advance(minutes=10)
    w.run()  # a rotation: one current key, one retiring
    before = w.state()
    renamed = dataclasses.replace(SPEC, name="monitor2")
    configured_as(w, renamed)
    w.clock.advance(seconds=30)

    with structlog.testing.capture_logs() as logs:
        report = w.engine.run_pass(renamed)

    assert report.ok and not report.rotated and report.foreign_keys == 0
    assert [a for a in report.actions if a.startswith("carry_over monitoring:")]
    carried = w.vault.read_state("monitor2").state
    assert carried.current == before.current and carried.retiring == before.retiring
    assert w.vault.read_state("monitoring").state.renamed_to == "monitor2"
    assert len(w.iam.keys_of("watcher_1")) == 2  # no key made
    [renaming] = [e for e in logs if e["event"] == "target_renamed"]
    assert renaming["old_target"] == "monitoring"
    assert w.engine.unconfigured() == {}
    # the retiring key is still retired on time, by the new name
    w.clock.advance(minutes=2)
    w.engine.run_pass(renamed)
    retired = before.retiring[0].key_id
    assert w.iam._find("watcher_1", retired).status is model.KeyStatus.INACTIVE


def test_the_dry_run_plan_of_a_renamed_target_says_its_state_is_carried_on() -> None:
    # it said "nothing to do" (new-user walkthrough), while the real pass marks and writes states
    w = World()
    w.run()
    renamed = dataclasses.replace(SPEC, name="monitor2")
    w.engine = engine.Engine(w.iam, w.vault, w.clock, configured=["monitor2"], dry_run=True)

    report = w.engine.run_pass(renamed)

    assert report.actions[0].startswith("carry_over monitoring: the target was renamed monitor2")
    assert w.vault.read_state("monitor2").version == 0  # nothing written
    assert w.vault.read_state("monitoring").state.renamed_to is None


def test_a_rename_that_changes_the_users_case_is_no_rename_and_marks_nothing() -> None:
    # the ownership check compares users exactly: a carry-over matching them another way marked
    # the old state, then was refused, and the old name could not be put back
    w = World()
    w.run()
    shouted = dataclasses.replace(SPEC, name="monitor2", user="WATCHER_1")
    configured_as(w, shouted)

    w.engine.run_pass(shouted)

    assert w.vault.read_state("monitoring").state.renamed_to is None
    [view] = w.engine.unconfigured_view([shouted])
    assert view.target == "monitoring" and view.heir is None
    configured_as(w, SPEC)  # and the old config still works
    assert w.engine.run_pass(SPEC).ok


def test_a_rename_interrupted_after_marking_the_old_state_is_finished_by_the_next_pass() -> None:
    w = World()
    w.run()
    old = w.vault.read_state("monitoring")
    w.vault.write_state("monitoring", old.state.replace(renamed_to="monitor2"), old.version)
    renamed = dataclasses.replace(SPEC, name="monitor2")
    configured_as(w, renamed)  # a new process: the crash came before the new state was written

    report = w.engine.run_pass(renamed)

    assert report.ok and not report.rotated and report.foreign_keys == 0
    assert w.vault.read_state("monitor2").state.current == old.state.current


def test_status_and_adopt_right_after_a_rename_see_the_carried_state_not_foreign_keys() -> None:
    w = World()
    w.run()
    key = w.vault.published_id(PATH)
    renamed = dataclasses.replace(SPEC, name="monitor2")
    daemon = engine.Engine(w.iam, w.vault, w.clock, configured=["monitor2"])
    assert list(daemon.unconfigured()) == ["monitoring"]  # a daemon started after the rename
    configured_as(w, renamed)  # the CLI
    writes = w.vault.writes

    view = w.engine.status(renamed)

    assert view.current_key_id == key and view.foreign == ()
    assert w.vault.writes == writes and "monitor2" not in w.vault.states  # status writes nothing
    # adopt goes through the rename first: the key is rotator's own, the old state marked
    assert "already managed" in w.engine.adopt(renamed, key or "")
    assert w.vault.read_state("monitoring").state.renamed_to == "monitor2"
    assert (
        w.vault.read_state("monitor2").state.current
        == w.vault.read_state("monitoring").state.current
    )
    assert daemon.run_pass(renamed).ok
    assert daemon.unconfigured() == {}  # carried on by the CLI: no longer counted


def test_a_rotator_still_running_the_old_name_stops_with_an_error_and_touches_nothing() -> None:
    w = World()
    w.run()
    renamed = dataclasses.replace(SPEC, name="monitor2")
    configured_as(w, renamed)
    w.engine.run_pass(renamed)
    keys = [(k.key_id, k.status) for k in w.iam.keys_of("watcher_1")]
    stale = engine.Engine(w.iam, w.vault, w.clock, configured=["monitoring"])
    w.clock.advance(minutes=11)  # the old name's key is due by now

    report = stale.run_pass(SPEC)

    assert not report.ok and report.error is not None
    assert "carried on by target monitor2" in report.error
    assert [(k.key_id, k.status) for k in w.iam.keys_of("watcher_1")] == keys


def test_a_target_renamed_back_takes_its_state_back_once_the_marked_state_is_deleted() -> None:
    w = World()
    w.run()
    key = w.vault.published_id(PATH)
    renamed = dataclasses.replace(SPEC, name="monitor2")
    configured_as(w, renamed)
    w.engine.run_pass(renamed)
    configured_as(w, SPEC)
    w.clock.advance(seconds=30)
    refused = w.run()
    assert not refused.ok and "delete this marked state first" in (refused.error or "")
    del w.vault.states["monitoring"]  # what the error says to do
    configured_as(w, SPEC)

    report = w.run()

    assert report.ok and not report.rotated
    assert w.state().current is not None and w.state().current.key_id == key
    assert w.vault.read_state("monitor2").state.renamed_to == "monitoring"


def test_a_removed_target_that_still_tracks_keys_is_listed_and_an_empty_one_is_not() -> None:
    w = World()
    w.run()
    w.clock.advance(minutes=10)
    w.run()  # monitoring: current + retiring
    other = dataclasses.replace(SPEC, name="other", user="watcher_2", secret_path="o/w2")
    w.vault.states["empty"] = w.vault.states["monitoring"].__class__(
        model.TargetState(user="nobody").to_document(), 1
    )
    configured_as(w, other)
    assert w.engine.unconfigured_count() is None  # not listed yet

    found = w.engine.unconfigured()

    assert list(found) == ["monitoring"]
    assert found["monitoring"].state.retiring
    assert w.engine.unconfigured_count() == 1
    state = found["monitoring"].state
    assert state.current is not None
    [view] = w.engine.unconfigured_view([other])
    assert view.keys() == [
        f"{state.current.key_id} (current)",
        f"{state.retiring[0].key_id} (retiring)",
    ]
    assert view.heir is None and "put the target back" in view.fate
    # a configured target with the same user (a rename) is its heir
    [renamed] = w.engine.unconfigured_view([other, dataclasses.replace(SPEC, name="monitor2")])
    assert renamed.heir == "monitor2" and "monitor2 has the same user" in renamed.fate


def test_a_policy_without_list_gets_one_warning_and_the_passes_go_on() -> None:
    w = World()
    w.vault.deny_list = True
    configured_as(w, SPEC)

    with structlog.testing.capture_logs() as logs:
        first = w.run()
        assert w.engine.unconfigured() == {}

    assert first.ok and first.rotated
    warned = [e for e in logs if e["event"] == "unconfigured_check_failed"]
    assert len([e for e in warned if "target" not in e]) == 1  # once for the listing
    # and once for the target without a state: a rename of it could not be seen
    [about] = [e for e in warned if e.get("target") == "monitoring"]
    assert "if it was renamed" in about["note"]
    w.clock.advance(seconds=30)
    with structlog.testing.capture_logs() as logs:
        assert w.run().ok
    assert not [e for e in logs if e["event"] == "unconfigured_check_failed"]


def test_a_grace_lengthened_then_shortened_by_reloads_keeps_the_longer_deadline() -> None:
    w = World()
    w.run()
    first = w.vault.published_id(PATH)
    w.clock.advance(minutes=10)
    w.run()  # first retires, grace 2 min
    longer = dataclasses.replace(SPEC, policy=dataclasses.replace(POLICY, grace=timedelta(hours=1)))
    w.clock.advance(seconds=30)
    w.engine.run_pass(longer)  # the reload's first pass writes the longer deadline down
    shorter = dataclasses.replace(SPEC, policy=dataclasses.replace(POLICY, grace=timedelta(0)))
    w.clock.advance(minutes=5)  # past the first grace, well before the longer one

    w.engine.run_pass(shorter)

    assert w.iam._find("watcher_1", first or "").status is model.KeyStatus.ACTIVE
    w.clock.advance(hours=1)
    w.engine.run_pass(shorter)
    assert w.iam._find("watcher_1", first or "").status is model.KeyStatus.INACTIVE


def test_policy_drift_creates_a_new_default_version_within_the_limit() -> None:
    w = World()
    w.run()
    for n in range(4):
        w.iam.create_policy_version("arn:fake:policy/monitoring", {"Statement": [{"n": n}]})
    assert len(w.iam.policies["monitoring"]) == 5
    w.restart()  # identity is checked at start
    w.run()
    versions = w.iam.policies["monitoring"]
    assert len(versions) == 5
    default = w.iam.default_version["monitoring"]
    assert next(d for v, d, _ in versions if v == default) == DOC
    assert "v1" not in [v for v, _, _ in versions]  # the oldest non-default went


def test_a_policy_changed_back_after_rotator_set_it_is_said_to_be_contested() -> None:
    # two rotators whose configs give the policy different documents rewrote it back and forth
    # at every identity check, logging only identity_changed at info
    w = World()
    w.run()
    other = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*"}]}
    for _ in range(2):
        w.iam.create_policy_version("arn:fake:policy/monitoring", other)  # the other rotator
        w.clock.advance(hours=1)
        with structlog.testing.capture_logs() as logs:
            w.run()
        contested = [e for e in logs if e["event"] == "policy_contested"]
        assert [(e["policy"], e["log_level"]) for e in contested] == [("monitoring", "warning")]
        assert "same document" in contested[0]["note"]
        default = w.iam.default_version["monitoring"]
        assert next(d for v, d, _ in w.iam.policies["monitoring"] if v == default) == DOC

    # the operator changes the document in rotator's own config: no contest, the new one set
    changed = dataclasses.replace(
        SPEC,
        desired=dataclasses.replace(
            SPEC.desired, policy=dataclasses.replace(SPEC.desired.policy, document=other)
        ),
    )
    w.clock.advance(hours=1)
    with structlog.testing.capture_logs() as logs:
        w.engine.run_pass(changed)
    assert [e for e in logs if e["event"] == "policy_contested"] == []


def test_targets_sharing_a_policy_change_it_once_when_their_passes_overlap() -> None:
    # 12 targets sharing a policy, after a reload that changed its document: two workers both
    # made a new version (v2 and v3), the second warned of a contest (its own engine had just
    # set that document), and at the version limit both deleted one old version (breaker c10)
    w = World()
    other = dataclasses.replace(SPEC, name="other", user="watcher_2", secret_path="o/w2")
    w.run()
    w.engine.run_pass(other)
    new_doc = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ec2:*"}]}

    def reloaded(spec: engine.TargetSpec) -> engine.TargetSpec:
        assert spec.desired is not None and spec.desired.policy is not None
        policy = dataclasses.replace(spec.desired.policy, document=new_doc)
        return dataclasses.replace(spec, desired=dataclasses.replace(spec.desired, policy=policy))

    first, second = reloaded(SPEC), reloaded(other)
    w.restart()  # the identity is checked again at start (as after a reload)
    reads = 0
    held: list[bool] = []  # the policy held by the reading pass: the other waits for it
    overlapping: list[threading.Thread] = []
    get_policy = w.iam.get_policy

    def read_then_overlap(name: str) -> model.Policy | None:
        nonlocal reads
        reads += 1
        found = get_policy(name)
        if reads == 2:  # the first target's fresh read, before it changes the policy
            held.append(w.engine._shared_changing[("policy", "monitoring")].locked())
            thread = threading.Thread(target=w.engine.run_pass, args=(second,))
            overlapping.append(thread)
            thread.start()
        return found

    w.iam.get_policy = read_then_overlap  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        w.engine.run_pass(first)
        for thread in overlapping:
            thread.join(10)

    assert held == [True]
    assert overlapping and not overlapping[0].is_alive()
    assert w.iam.calls.count("CreatePolicyVersion") == 1
    assert [e for e in logs if e["event"] == "policy_contested"] == []
    default = w.iam.default_version["monitoring"]
    assert next(d for v, d, _ in w.iam.policies["monitoring"] if v == default) == new_doc


def test_identity_is_not_rechecked_on_every_pass() -> None:
    w = World()
    w.run()
    w.clock.advance(seconds=30)
    w.iam.calls.clear()
    w.run()
    assert "ListGroupsForUser" not in w.iam.calls
    w.clock.advance(hours=1)
    w.run()
    assert "ListGroupsForUser" in w.iam.calls


def make_fleet(count: int) -> tuple[World, list[engine.TargetSpec]]:
    """``count`` targets, each with its own user, all sharing one group and one policy."""
    w = World()
    specs = [
        dataclasses.replace(
            SPEC,
            name=f"t{i}",
            user=f"user{i}",
            secret_path=f"fleet/t{i}",
            desired=dataclasses.replace(SPEC.desired, user=f"user{i}"),
        )
        for i in range(count)
    ]
    return w, specs


def test_a_sweep_reads_the_shared_group_and_policy_once_not_once_per_target() -> None:
    w, specs = make_fleet(5)
    for spec in specs:
        assert w.engine.run_pass(spec).ok
    w.iam.calls.clear()
    restarted = engine.Engine(w.iam, w.vault, w.clock)  # a new process checks every identity

    reports = [restarted.run_pass(spec) for spec in specs]

    assert all(r.ok and not r.rotated for r in reports)
    assert w.iam.calls.count("ListGroupsForUser") == 5  # the user and its groups: per target
    assert w.iam.calls.count("ListAttachedGroupPolicies") == 1
    assert w.iam.calls.count("GetPolicy") == 1


def test_a_bootstrap_reads_the_shared_group_and_policy_again_only_for_their_own_changes() -> None:
    w, specs = make_fleet(5)

    reports = [w.engine.run_pass(spec) for spec in specs]

    assert all(r.ok and r.rotated for r in reports)
    assert all(any(a.startswith("create_user") for a in r.actions) for r in reports)
    # the first target reads them, sees them missing, reads them afresh and creates them; the
    # second reads them once more (its creator forgot the stale read); the others share that
    assert w.iam.calls.count("ListAttachedGroupPolicies") == 3
    assert w.iam.calls.count("GetPolicy") == 3 + 1  # + 1: the new policy's ARN, to attach it


def test_an_identity_check_that_finds_nothing_to_change_takes_no_lease_and_writes_nothing() -> None:
    w = World()
    w.run()
    lock = FakeLock(w.clock)
    lock.acquire(SPEC.name, "replica-b", 3600)  # were the lease needed, the pass would skip
    restarted = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-a")
    writes = w.vault.writes

    report = restarted.run_pass(SPEC)

    assert report.ok and report.skipped is None
    assert "ListGroupsForUser" in w.iam.calls
    assert w.vault.writes == writes


def test_a_shared_read_older_than_its_max_age_is_read_again() -> None:
    w, specs = make_fleet(2)
    for spec in specs:
        w.engine.run_pass(spec)
    w.clock.advance(hours=1)  # both identities due again
    w.iam.calls.clear()
    w.engine.run_pass(specs[0])
    w.clock.advance(seconds=engine.SHARED_READS_MAX_AGE.total_seconds())

    w.engine.run_pass(specs[1])

    assert w.iam.calls.count("ListAttachedGroupPolicies") == 2


def test_a_policy_drift_seen_in_a_shared_read_is_repaired_from_a_fresh_read() -> None:
    w, specs = make_fleet(2)
    for spec in specs:
        w.engine.run_pass(spec)
    w.clock.advance(hours=1)
    w.engine.run_pass(specs[0])  # the shared reads are now fresh and show no drift
    w.iam.create_policy_version("arn:fake:policy/monitoring", {"Statement": []})  # drift

    w.engine.run_pass(specs[1])  # its shared read is stale: no drift seen, nothing done
    w.clock.advance(hours=1)
    report = w.engine.run_pass(specs[1])

    assert any(a.startswith("create_policy_version") for a in report.actions)
    default = w.iam.default_version["monitoring"]
    assert [d for v, d, _ in w.iam.policies["monitoring"] if v == default] == [DOC]


def test_dry_run_plans_but_changes_nothing() -> None:
    w = World()
    dry = engine.Engine(w.iam, w.vault, w.clock, dry_run=True)
    report = dry.run_pass(SPEC)
    assert report.dry_run
    assert any(a.startswith("create_group") for a in report.actions)
    assert any(a.startswith("create_key") for a in report.actions)
    assert w.iam.groups == {} and w.vault.states == {} and w.vault.published == {}


def test_a_dry_run_after_a_secret_path_change_plans_the_copy_and_no_new_key() -> None:
    w = World()
    w.run()
    key = w.vault.published_id(PATH)
    spec = moved(w, NEW_PATH)
    w.clock.advance(seconds=30)

    report = engine.Engine(w.iam, w.vault, w.clock, dry_run=True).run_pass(spec)

    assert report.dry_run and report.ok
    assert [a.split(":")[0] for a in report.actions] == [f"move_secret {key}"]
    assert w.vault.published_id(NEW_PATH) is None and w.state().secret_path == PATH


def test_secret_write_failure_after_create_deletes_the_key_at_once() -> None:
    w = World()
    w.run()
    w.clock.advance(minutes=10)
    real_write = w.vault.write_state
    calls = {"n": 0}

    def flaky(target: str, state: model.TargetState, version: int) -> int:
        calls["n"] += 1
        if state.pending is not None:
            raise errors.VaultUnavailable("vault went away")
        return real_write(target, state, version)

    w.vault.write_state = flaky  # type: ignore[method-assign]
    report = w.run()
    assert not report.ok and "vault" in report.error_components
    assert len(w.iam.keys_of("watcher_1")) == 1  # only the published key remains
    assert w.published_works()


def test_response_lost_after_create_leaves_no_leaked_key_once_its_orphan_hold_ends() -> None:
    w = World()
    w.run()
    w.clock.advance(minutes=10)
    w.iam.crash.at = w.iam.crash.calls + 1  # the intent write, then CreateAccessKey
    w.iam.crash.after_apply = True
    with pytest.raises(Crash):
        w.run()
    assert len(w.iam.keys_of("watcher_1")) == 2
    orphan = next(
        k.key_id for k in w.iam.keys_of("watcher_1") if k.key_id != w.vault.published_id(PATH)
    )
    w.restart()
    w.clock.advance(seconds=30)
    with structlog.testing.capture_logs() as logs:
        held = w.run()  # the orphan is held Inactive (it could be someone's): both slots taken
    assert held.blocked and w.iam._find("watcher_1", orphan).status is model.KeyStatus.INACTIVE
    assert [e["key_id"] for e in logs if e["event"] == "key_quarantined"] == [orphan]
    assert w.published_works()
    w.clock.advance(minutes=2, seconds=1)  # the hold: the target's inactive_period (2 min) here
    report = w.run()
    assert report.rotated
    ours = {k.key_id for k in w.iam.keys_of("watcher_1")}
    assert orphan not in ours and ours == w.state().tracked_ids()
    assert len(ours) == 2 and w.published_works()


def test_stop_requested_during_verification_keeps_the_pending_key_for_the_next_pass() -> None:
    w = World()
    w.iam.propagation = timedelta(seconds=15)
    real_verify = w.iam.verify_key

    def verify_then_stop(key_id: str, secret: model.Secret) -> model.VerifyResult:
        result = real_verify(key_id, secret)
        w.clock.stop_requested = True
        return result

    w.iam.verify_key = verify_then_stop  # type: ignore[method-assign]
    report = w.run()
    assert not report.rotated
    assert w.state().pending is not None
    w.clock.stop_requested = False
    w.iam.verify_key = real_verify  # type: ignore[method-assign]
    w.restart()
    assert w.run().rotated and w.published_works()


def test_unknown_state_schema_stops_the_target_with_a_clear_error() -> None:
    w = World()
    w.run()
    w.vault.states["monitoring"].data["schema"] = 99
    report = w.run()
    assert not report.ok
    assert report.error is not None and "schema 99" in report.error
    assert report.error_components == ("vault",)


def test_user_missing_without_managed_identity_names_the_fix() -> None:
    w = World(engine.TargetSpec(name="t", user="ghost", secret_path="t/ghost", policy=POLICY))
    report = w.run()
    assert not report.ok
    assert report.error is not None and "ghost does not exist" in report.error


def test_a_target_whose_lease_another_replica_holds_is_skipped_untouched() -> None:
    w = World()
    lock = FakeLock(w.clock)
    lock.acquire(SPEC.name, "replica-b", 15)
    mine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-a")
    report = mine.run_pass(SPEC)
    assert report.skipped == "lock held by replica-b" and report.ok
    assert w.iam.groups == {} and w.vault.states == {}
    lock.release(SPEC.name, "replica-b")
    assert mine.run_pass(SPEC).rotated
    assert lock.holder(SPEC.name) is None  # released at the end of the pass


def test_adopt_waits_for_the_lease_a_pass_holds_and_takes_it_itself() -> None:
    # it wrote the state while the daemon held the lease mid-rotation, whose state write then
    # lost check-and-set after the publish (breaker c17)
    w = World()
    w.iam.users["watcher_1"] = []
    hand = w.iam.add_foreign_key("watcher_1")
    w.run()
    lock = FakeLock(w.clock)
    lock.acquire(SPEC.name, "replica-b", 15)
    mine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-a")
    before = w.vault.read_state(SPEC.name).version

    with pytest.raises(errors.LockError) as held:
        mine.adopt(SPEC, hand, lock_wait=1.0)

    assert "not adopted" in str(held.value) and "replica-b" in str(held.value)
    assert w.vault.read_state(SPEC.name).version == before  # nothing written
    lock.release(SPEC.name, "replica-b")
    assert "adopted" in mine.adopt(SPEC, hand, lock_wait=1.0)
    assert lock.holder(SPEC.name) is None  # given back


def test_an_idle_pass_does_not_take_the_lease() -> None:
    w = World()
    lock = FakeLock(w.clock)
    mine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-a")
    mine.run_pass(SPEC)
    lock.acquire(SPEC.name, "replica-b", 3600)
    w.clock.advance(seconds=30)
    report = mine.run_pass(SPEC)
    assert report.skipped is None and report.ok and not report.rotated


def test_a_lease_nobody_held_since_this_engine_released_it_skips_the_state_reread() -> None:
    w = World()
    lock = FakeLock(w.clock)
    mine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-a")
    mine.run_pass(SPEC)  # first key: the lease is taken, the state read twice
    reads = w.vault.state_reads

    report = mine.run_pass(SPEC, force=True)

    assert report.rotated and report.ok
    assert w.vault.state_reads - reads == 1  # observed once; the resumed lease needs no re-read


def test_a_lease_another_replica_held_meanwhile_makes_the_pass_read_the_state_again() -> None:
    w = World()
    lock = FakeLock(w.clock)
    mine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-a")
    other = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-b")
    assert other.run_pass(SPEC).rotated  # b made the first key under the lease
    reads = w.vault.state_reads

    report = mine.run_pass(SPEC, force=True)

    assert report.rotated and report.ok
    assert w.vault.state_reads - reads == 2
    assert len(w.iam.keys_of(SPEC.user)) <= 2


def test_rotate_waits_for_the_lease_and_then_reports_the_holder() -> None:
    w = World()
    lock = FakeLock(w.clock)
    lock.acquire(SPEC.name, "replica-b", 3600)
    mine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="replica-a")
    report = mine.run_pass(SPEC, force=True, lock_wait=0.05)
    assert report.skipped == "lock held by replica-b"


def test_the_policy_is_created_under_its_configured_path() -> None:
    wanted = identity.WantedPolicy("monitoring", DOC, "Allow describe", path="/rotator/")
    desired = identity.Desired(user="watcher_1", group="monitoring", policy=wanted)
    w = World(engine.TargetSpec("monitoring", "watcher_1", PATH, POLICY, desired=desired))
    assert w.run().ok
    assert w.iam.policy_paths == {"monitoring": "/rotator/"}


def test_a_failing_pass_before_the_keys_are_listed_still_records_its_error() -> None:
    w = World(engine.TargetSpec(name="t", user="ghost", secret_path="t/ghost", policy=POLICY))
    w.run()
    assert w.state().last_error is not None and "ghost does not exist" in w.state().last_error
    view = w.engine.status(w.spec)
    assert view.last_error is not None and "ghost does not exist" in view.last_error


def test_a_key_verified_before_a_failed_publish_is_published_next_pass_without_a_new_attempt() -> (
    None
):
    w = World()
    w.run()
    w.clock.advance(minutes=10)
    real = w.vault.write_published

    def vault_gone(*args: object, **kwargs: object) -> model.Published:
        raise errors.VaultUnavailable("vault went away")

    w.vault.write_published = vault_gone  # type: ignore[assignment,method-assign]
    assert not w.run().ok
    pending = w.state().pending
    assert pending is not None and pending.verified_at is not None
    attempts = w.iam.verify_attempts[pending.key_id]
    w.vault.write_published = real  # type: ignore[method-assign]
    w.clock.advance(seconds=1)
    assert w.run().rotated
    assert w.iam.verify_attempts[pending.key_id] == attempts
    assert w.vault.published_id(PATH) == pending.key_id


def test_a_create_refused_by_iam_clears_the_marker_so_a_key_made_by_hand_next_stays() -> None:
    w = World()
    w.run()
    w.clock.advance(seconds=30)
    real = w.iam.create_key

    def denied(user: str) -> model.NewKey:
        raise errors.EimAccessDenied("denied", code="AccessDenied", action="iam:CreateAccessKey")

    w.iam.create_key = denied  # type: ignore[method-assign]
    assert not w.run(force=True).ok
    assert w.state().intent is None  # IAM said it made nothing
    w.iam.create_key = real  # type: ignore[method-assign]
    hand = w.iam.add_foreign_key("watcher_1")
    w.clock.advance(seconds=30)
    w.run()
    assert hand in [k.key_id for k in w.iam.keys_of("watcher_1")]


@pytest.mark.parametrize("made", [True, False])
def test_a_create_whose_answer_is_lost_is_settled_in_the_same_pass(made: bool) -> None:
    w = World()
    w.run()
    w.clock.advance(seconds=30)
    before = {k.key_id for k in w.iam.keys_of("watcher_1")}
    real = w.iam.create_key

    def lost(user: str) -> model.NewKey:
        if made:
            real(user)  # IAM made the key, its answer never came back
        raise errors.EimTransientError("read timeout", code="ReadTimeoutError")

    w.iam.create_key = lost  # type: ignore[method-assign]
    assert not w.run(force=True).ok
    assert w.state().intent is None  # the keys were listed again: nothing left to guess
    assert {k.key_id for k in w.iam.keys_of("watcher_1")} == before  # a made key is deleted


def test_a_create_whose_answer_is_lost_with_iam_still_away_keeps_the_marker() -> None:
    w = World()
    w.run()
    w.clock.advance(seconds=30)
    real_list = w.iam.list_keys

    def lost(user: str) -> model.NewKey:
        w.iam.list_keys = away  # type: ignore[method-assign]
        raise errors.EimTransientError("read timeout", code="ReadTimeoutError")

    def away(user: str) -> list[model.AccessKey]:
        raise errors.EimTransientError("connection refused", code="EndpointConnectionError")

    w.iam.create_key = lost  # type: ignore[method-assign]
    assert not w.run(force=True).ok
    assert w.state().intent is not None  # a key may exist: the next pass looks for it
    w.iam.list_keys = real_list  # type: ignore[method-assign]


def test_a_key_made_by_hand_while_the_pass_waited_is_never_the_orphan_of_its_marker() -> None:
    w = World(dataclasses.replace(SPEC, policy=dataclasses.replace(POLICY, max_keys=3)))
    w.iam.quota = 3  # a slot is still free once the hand key is made
    lock = FakeLock(w.clock)
    w.engine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="a")
    w.run()
    w.clock.advance(seconds=30)
    real_acquire, real_create = lock.acquire, w.iam.create_key
    made: list[str] = []

    def slow_acquire(target: str, holder: str, ttl: float) -> model.Grant | None:
        w.clock.advance(seconds=2)  # the lease took 2 s (a slow Vault, a lease waited for)
        made.append(w.iam.add_foreign_key("watcher_1"))  # meanwhile someone makes a key
        return real_acquire(target, holder, ttl)

    markers: list[model.Intent | None] = []

    def lost(user: str) -> model.NewKey:
        markers.append(w.state().intent)  # as written just before the call
        raise errors.EimTransientError("read timeout", code="ReadTimeoutError")

    lock.acquire = slow_acquire  # type: ignore[method-assign]
    w.iam.create_key = lost  # type: ignore[method-assign]
    assert not w.engine.run_pass(w.spec, force=True).ok
    intent = markers[0]
    assert intent is not None and made[0] in intent.existing_ids
    lock.acquire = real_acquire  # type: ignore[method-assign]
    w.iam.create_key = real_create  # type: ignore[method-assign]
    w.clock.advance(seconds=30)
    w.engine.run_pass(w.spec)
    assert made[0] in [k.key_id for k in w.iam.keys_of("watcher_1")]


def test_a_forced_rotation_makes_only_the_calls_a_rotation_needs() -> None:
    w = World()
    lock = FakeLock(w.clock)
    w.engine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, holder="a")
    w.run()
    w.clock.advance(seconds=30)
    w.iam.calls.clear()
    writes = w.vault.writes
    assert w.engine.run_pass(SPEC, force=True).rotated
    assert w.iam.calls == ["ListAccessKeys", "CreateAccessKey", "Verify"]
    assert w.vault.writes - writes == 3  # intent, pending, promotion with the outcome
    w.iam.calls.clear()
    report = w.engine.run_pass(SPEC, force=True, check_identity=True)
    assert report.blocked  # the previous key is still in its grace period
    assert {"ListGroupsForUser", "ListAttachedGroupPolicies", "GetPolicy"} <= set(w.iam.calls)
    # `rotator rotate` also checks the identity, reading even the shared group and policy
