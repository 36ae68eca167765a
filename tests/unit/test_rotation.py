"""The pure rotation decisions, with plain data and an explicit `now`: no mocks needed."""

from __future__ import annotations

from datetime import timedelta

from rotator import model, rotation
from rotator.rotation import ActionKind
from tests.unit.fakes import T0

POLICY = rotation.Policy(
    max_age=timedelta(days=30),
    grace=timedelta(days=1),
    inactive_period=timedelta(days=3),
    check_interval=timedelta(minutes=5),
)
A = model.KeyStatus.ACTIVE
I = model.KeyStatus.INACTIVE  # noqa: E741


def key(key_id: str, status: model.KeyStatus = A, age: timedelta = timedelta(0)) -> model.AccessKey:
    return model.AccessKey(key_id, status, T0 - age)


def published(key_id: str | None) -> model.Published:
    return model.Published(key_id, T0 if key_id else None, {}, 1 if key_id else 0)


def current(key_id: str, age: timedelta = timedelta(0)) -> model.CurrentKey:
    return model.CurrentKey(key_id, T0 - age, T0 - age, T0 - age)


def kinds(decision: rotation.Decision) -> list[ActionKind]:
    return [a.kind for a in decision.actions]


def test_bootstrap_with_no_key_creates_one() -> None:
    d = rotation.decide([], model.TargetState(), published(None), POLICY, T0)
    assert kinds(d) == [ActionKind.CREATE_KEY]
    assert d.due_reason is not None and "first key" in d.due_reason


def test_young_current_key_needs_nothing_and_reports_next_due() -> None:
    state = model.TargetState(current=current("K1", timedelta(days=2)), created_ids=("K1",))
    d = rotation.decide([key("K1", age=timedelta(days=2))], state, published("K1"), POLICY, T0)
    assert kinds(d) == []
    assert d.due_reason is None
    assert d.next_due == T0 + timedelta(days=28)


def test_key_at_max_age_is_rotated() -> None:
    state = model.TargetState(current=current("K1", timedelta(days=30)), created_ids=("K1",))
    d = rotation.decide([key("K1", age=timedelta(days=30))], state, published("K1"), POLICY, T0)
    assert kinds(d) == [ActionKind.CREATE_KEY]
    assert d.due_reason == "current key reached max_age"


def test_rotation_window_closed_defers_an_age_rotation_but_not_a_repair() -> None:
    state = model.TargetState(current=current("K1", timedelta(days=31)), created_ids=("K1",))
    keys = [key("K1", age=timedelta(days=31))]
    closed = rotation.decide(keys, state, published("K1"), POLICY, T0, window_open=lambda _: False)
    assert kinds(closed) == []
    repair = rotation.decide([], state, published("K1"), POLICY, T0, window_open=lambda _: False)
    assert kinds(repair) == [ActionKind.CREATE_KEY]
    assert repair.due_reason == "current key is gone from IAM"


def test_no_free_slot_is_blocked_and_names_the_foreign_key() -> None:
    state = model.TargetState(current=current("K1", timedelta(days=30)), created_ids=("K1",))
    keys = [key("K1", age=timedelta(days=30)), key("HAND")]
    d = rotation.decide(keys, state, published("K1"), POLICY, T0)
    assert kinds(d) == [ActionKind.BLOCKED]
    assert d.blocked is not None and "HAND" in d.blocked and "adopt" in d.blocked
    assert d.foreign == ("HAND",)


def test_a_published_secret_whose_latest_version_holds_no_key_says_it_was_deleted() -> None:
    state = model.TargetState(current=current("K1", timedelta(days=1)), created_ids=("K1",))
    deleted = model.Published(None, None, {}, version=3)  # as KV v2 reads a deleted version

    d = rotation.decide([key("K1", age=timedelta(days=1))], state, deleted, POLICY, T0)

    assert kinds(d) == [ActionKind.CREATE_KEY]
    assert d.due_reason is not None and "latest version (3) holds no key" in d.due_reason
    assert "delete_version_after" in d.due_reason


def test_blocked_while_the_published_secret_is_broken_says_why_a_key_is_needed_now() -> None:
    # a consumer wrote a bogus key id over the secret; both slots are taken (current, retiring)
    state = model.TargetState(
        current=current("K2", timedelta(hours=1)),
        retiring=(model.RetiringKey("K1", T0 + timedelta(hours=20), since=T0),),
        created_ids=("K1", "K2"),
    )
    keys = [key("K1", age=timedelta(days=2)), key("K2", age=timedelta(hours=1))]

    d = rotation.decide(keys, state, published("BOGUS"), POLICY, T0)

    assert d.blocked is not None and d.blocked.startswith("no free key slot")
    assert "a new key is needed now: the published secret does not hold a key" in d.blocked


def test_blocked_by_a_retiring_key_says_when_it_is_deleted_and_how_to_rotate_sooner() -> None:
    # a rollback made the old key current again: it is past max_age, the newer key retires
    state = model.TargetState(
        current=current("K1", timedelta(days=31)),
        retiring=(model.RetiringKey("K2", T0 + timedelta(days=1), since=T0),),
        created_ids=("K1", "K2"),
    )
    keys = [key("K1", age=timedelta(days=31)), key("K2", age=timedelta(hours=1))]

    d = rotation.decide(keys, state, published("K1"), POLICY, T0)

    assert kinds(d) == [ActionKind.BLOCKED]
    assert d.blocked is not None
    assert "K2 is due to be deleted at 2026-01-05T00:00:00Z" in d.blocked  # grace, then Inactive
    assert "delete a retiring key by hand once nobody uses it" in d.blocked
    assert "shorten" not in d.blocked  # a shorter grace would not cut K2's deadline


def test_deleting_an_expired_retiring_key_frees_the_slot_in_the_same_pass() -> None:
    state = model.TargetState(
        current=current("K2", timedelta(days=30)),
        retiring=(
            model.RetiringKey(
                "K1", T0 - timedelta(days=5), T0 - timedelta(days=4), T0 - timedelta(hours=1)
            ),
        ),
        created_ids=("K1", "K2"),
    )
    keys = [key("K1", I, timedelta(days=35)), key("K2", age=timedelta(days=30))]
    d = rotation.decide(keys, state, published("K2"), POLICY, T0)
    assert kinds(d) == [ActionKind.DELETE_RETIRED, ActionKind.CREATE_KEY]


def test_retiring_key_is_deactivated_after_grace_then_deleted_after_inactive_period() -> None:
    retiring = model.RetiringKey("K1", retire_at=T0)
    state = model.TargetState(current=current("K2"), retiring=(retiring,), created_ids=("K1", "K2"))
    keys = [key("K1", age=timedelta(days=31)), key("K2")]
    before = rotation.decide(keys, state, published("K2"), POLICY, T0 - timedelta(seconds=1))
    assert kinds(before) == []
    at = rotation.decide(keys, state, published("K2"), POLICY, T0)
    assert kinds(at) == [ActionKind.DEACTIVATE]
    state2 = rotation.deactivated(state, "K1", POLICY, T0)
    assert state2.retiring[0].delete_at == T0 + POLICY.inactive_period
    keys2 = [key("K1", I, timedelta(days=31)), key("K2")]
    early = rotation.decide(keys2, state2, published("K2"), POLICY, T0 + timedelta(days=2))
    assert kinds(early) == []
    late = rotation.decide(keys2, state2, published("K2"), POLICY, T0 + timedelta(days=3))
    assert kinds(late) == [ActionKind.DELETE_RETIRED]


def test_a_grace_lengthened_by_a_reload_applies_to_a_key_already_retiring() -> None:
    started = T0 - timedelta(hours=25)  # began to retire 25 h ago, under a grace of 1 day
    state = model.TargetState(
        current=current("K2", timedelta(hours=25)),
        retiring=(model.RetiringKey("K1", retire_at=started + POLICY.grace, since=started),),
        created_ids=("K1", "K2"),
    )
    keys = [key("K1", age=timedelta(days=31)), key("K2", age=timedelta(hours=25))]
    longer = rotation.Policy(**{**POLICY.__dict__, "grace": timedelta(days=2)})
    shorter = rotation.Policy(**{**POLICY.__dict__, "grace": timedelta(hours=1)})

    assert kinds(rotation.decide(keys, state, published("K2"), POLICY, T0)) == [
        ActionKind.DEACTIVATE
    ]
    assert kinds(rotation.decide(keys, state, published("K2"), longer, T0)) == []
    later = started + timedelta(days=2)
    assert kinds(rotation.decide(keys, state, published("K2"), longer, later)) == [
        ActionKind.DEACTIVATE
    ]
    # a shorter grace never cuts the one given: still not before the stored deadline
    early = started + timedelta(hours=2)
    assert kinds(rotation.decide(keys, state, published("K2"), shorter, early)) == []


def test_an_inactive_period_lengthened_by_a_reload_applies_to_a_key_already_inactive() -> None:
    off = T0 - timedelta(days=3, hours=1)
    state = model.TargetState(
        current=current("K2", timedelta(days=5)),
        retiring=(
            model.RetiringKey(
                "K1",
                retire_at=off,
                deactivated_at=off,
                delete_at=off + POLICY.inactive_period,
                since=off - POLICY.grace,
            ),
        ),
        created_ids=("K1", "K2"),
    )
    keys = [key("K1", I, age=timedelta(days=35)), key("K2", age=timedelta(days=5))]
    longer = rotation.Policy(**{**POLICY.__dict__, "inactive_period": timedelta(days=7)})

    assert kinds(rotation.decide(keys, state, published("K2"), POLICY, T0)) == [
        ActionKind.DELETE_RETIRED
    ]
    assert kinds(rotation.decide(keys, state, published("K2"), longer, T0)) == []


def test_a_retiring_key_written_before_since_existed_keeps_its_stored_deadline() -> None:
    state = model.TargetState(
        current=current("K2", timedelta(hours=25)),
        retiring=(model.RetiringKey("K1", retire_at=T0 - timedelta(hours=1)),),
        created_ids=("K1", "K2"),
    )
    keys = [key("K1", age=timedelta(days=31)), key("K2", age=timedelta(hours=25))]
    longer = rotation.Policy(**{**POLICY.__dict__, "grace": timedelta(days=7)})
    assert kinds(rotation.decide(keys, state, published("K2"), longer, T0)) == [
        ActionKind.DEACTIVATE
    ]


def test_the_published_key_is_never_retired_even_if_state_says_so() -> None:
    state = model.TargetState(
        current=current("K2"),
        retiring=(model.RetiringKey("K1", T0 - timedelta(days=9), T0 - timedelta(days=8), T0),),
        created_ids=("K1", "K2"),
    )
    keys = [key("K1", I), key("K2")]
    d = rotation.decide(keys, state, published("K1"), POLICY, T0 + timedelta(days=1))
    assert all(a.key_id != "K1" for a in d.actions)


def test_key_created_after_the_intent_marker_is_an_orphan_held_inactive_before_deletion() -> None:
    intent = model.Intent(T0 - timedelta(seconds=1, microseconds=500_000), ("K1",))
    state = model.TargetState(current=current("K1"), intent=intent, created_ids=("K1",))
    # IAM reports whole seconds: the orphan's create date is rounded down below the intent
    orphan = model.AccessKey("K9", A, model.whole_seconds(intent.started_at))
    d = rotation.decide([key("K1"), orphan], state, published("K1"), POLICY, T0)
    assert [(a.kind, a.key_id) for a in d.actions] == [
        (ActionKind.QUARANTINE_ORPHAN, "K9"),
        (ActionKind.CLEAR_INTENT, None),
    ]


def test_an_orphan_dated_before_its_marker_by_a_clock_ahead_of_iam_is_still_taken() -> None:
    # rotator's clock 3 s ahead of IAM's: the key IAM made for the intent looks older than it.
    intent = model.Intent(T0, ("K1",))
    state = model.TargetState(current=current("K1"), intent=intent, created_ids=("K1",))
    orphan = model.AccessKey("K9", A, T0 - timedelta(seconds=3))
    d = rotation.decide([key("K1"), orphan], state, published("K1"), POLICY, T0)
    assert [(a.kind, a.key_id) for a in d.actions] == [
        (ActionKind.QUARANTINE_ORPHAN, "K9"),
        (ActionKind.CLEAR_INTENT, None),
    ]


def test_a_held_orphan_is_deleted_when_its_hold_ends_and_released_if_made_active() -> None:
    hold = min(POLICY.inactive_period, rotation.ORPHAN_HOLD)
    state = rotation.quarantined(
        model.TargetState(current=current("K1"), created_ids=("K1",)), "K9", POLICY, T0
    )
    held = state.retiring[-1]
    assert held.orphan and held.delete_at == T0 + hold and state.intent is None
    inactive = model.AccessKey("K9", model.KeyStatus.INACTIVE, T0)

    before = rotation.decide([key("K1"), inactive], state, published("K1"), POLICY, T0 + hold / 2)
    after = rotation.decide([key("K1"), inactive], state, published("K1"), POLICY, T0 + hold)
    again = rotation.decide([key("K1"), key("K9")], state, published("K1"), POLICY, T0)

    assert kinds(before) == [] and before.foreign == ()
    assert [(a.kind, a.key_id) for a in after.actions] == [(ActionKind.DELETE_RETIRED, "K9")]
    assert [(a.kind, a.key_id) for a in again.actions] == [(ActionKind.RELEASE_ORPHAN, "K9")]
    released = rotation.forget_gone(state, "K9")
    assert rotation.decide(
        [key("K1"), key("K9")], released, published("K1"), POLICY, T0
    ).foreign == ("K9",)


def test_a_key_dated_before_the_marker_by_more_than_the_skew_is_foreign() -> None:
    intent = model.Intent(T0, ("K1",))
    state = model.TargetState(current=current("K1"), intent=intent, created_ids=("K1",))
    old = model.AccessKey("HAND", A, T0 - rotation.MAX_CLOCK_SKEW - timedelta(seconds=1))
    d = rotation.decide([key("K1"), old], state, published("K1"), POLICY, T0)
    assert kinds(d) == [ActionKind.CLEAR_INTENT]
    assert d.foreign == ("HAND",)


def test_a_key_listed_before_the_marker_is_never_its_orphan_whatever_its_date() -> None:
    intent = model.Intent(T0, ("K1", "HAND"))
    state = model.TargetState(current=current("K1"), intent=intent, created_ids=("K1",))
    hand = model.AccessKey("HAND", A, T0 - timedelta(seconds=3))
    d = rotation.decide([key("K1"), hand], state, published("K1"), POLICY, T0)
    assert ActionKind.DELETE_ORPHAN not in kinds(d)
    assert d.foreign == ("HAND",)


def test_key_created_before_the_intent_is_foreign_not_orphan() -> None:
    intent = model.Intent(T0, ("K1", "HAND"))
    state = model.TargetState(current=current("K1"), intent=intent, created_ids=("K1",))
    hand = model.AccessKey("HAND", A, T0 + timedelta(seconds=5))
    d = rotation.decide([key("K1"), hand], state, published("K1"), POLICY, T0 + timedelta(1))
    assert ActionKind.DELETE_ORPHAN not in kinds(d)
    assert d.foreign == ("HAND",)


def test_our_untracked_key_is_deleted_but_never_the_published_one() -> None:
    state = model.TargetState(current=current("K2"), created_ids=("K1", "K2", "K3"))
    keys = [key("K2"), key("K3")]
    d = rotation.decide(keys, state, published("K2"), POLICY, T0)
    assert [(a.kind, a.key_id) for a in d.actions] == [(ActionKind.DELETE_ORPHAN, "K3")]
    d2 = rotation.decide(keys, state, published("K3"), POLICY, T0)
    assert ActionKind.DELETE_ORPHAN not in kinds(d2)


def test_pending_key_is_resolved_and_no_second_key_is_created() -> None:
    pending = model.PendingKey("K2", model.Secret("s" * 40), T0)
    state = model.TargetState(
        current=current("K1", timedelta(days=40)), pending=pending, created_ids=("K1", "K2")
    )
    keys = [key("K1", age=timedelta(days=40)), key("K2")]
    d = rotation.decide(keys, state, published("K1"), POLICY, T0, force=True)
    assert kinds(d) == [ActionKind.RESOLVE_PENDING]


def test_pending_key_already_published_is_promoted_without_verifying_again() -> None:
    pending = model.PendingKey("K2", model.Secret("s" * 40), T0)
    state = model.TargetState(
        current=current("K1", timedelta(days=40)), pending=pending, created_ids=("K1", "K2")
    )
    keys = [key("K1", age=timedelta(days=40)), key("K2")]
    d = rotation.decide(keys, state, published("K2"), POLICY, T0)
    assert kinds(d) == [ActionKind.PROMOTE_PENDING]
    promoted = rotation.promote(state, pending, POLICY, T0)
    assert promoted.current is not None and promoted.current.key_id == "K2"
    assert [r.key_id for r in promoted.retiring] == ["K1"]
    assert promoted.retiring[0].retire_at == T0 + POLICY.grace


def test_vanished_pending_key_is_dropped_and_a_fresh_one_created() -> None:
    pending = model.PendingKey("K2", model.Secret("s" * 40), T0)
    state = model.TargetState(pending=pending, created_ids=("K2",))
    d = rotation.decide([], state, published(None), POLICY, T0)
    assert kinds(d) == [ActionKind.DROP_PENDING, ActionKind.CREATE_KEY]


def test_backoff_after_a_failed_rotation_delays_the_next_attempt() -> None:
    state = model.TargetState(retry_after=T0 + timedelta(minutes=5), failures=1)
    d = rotation.decide([], state, published(None), POLICY, T0)
    assert kinds(d) == []
    assert d.next_due == T0 + timedelta(minutes=5)
    forced = rotation.decide([], state, published(None), POLICY, T0, force=True)
    assert kinds(forced) == [ActionKind.CREATE_KEY]


def test_hand_edited_published_secret_with_a_key_not_in_iam_triggers_a_new_key() -> None:
    state = model.TargetState(current=current("K1"), created_ids=("K1",))
    d = rotation.decide([key("K1")], state, published("BOGUS"), POLICY, T0)
    assert kinds(d) == [ActionKind.CREATE_KEY]


def test_verification_schedule_is_at_most_three_attempts_a_minute() -> None:
    attempts_at = [timedelta(0)]
    for n in range(1, 6):
        attempts_at.append(attempts_at[-1] + rotation.verify_delay(n))
    in_first_minute = [t for t in attempts_at if t < timedelta(minutes=1)]
    assert len(in_first_minute) == 3
    assert rotation.verify_delay(10) == rotation.VERIFY_MAX_DELAY


def test_no_verification_attempt_falls_inside_outscales_lock_out() -> None:
    # OUTSCALE blocks a key for a minute after 4 failed signatures in a row, a minute more for
    # every 4 more: an attempt inside a block is refused however well the key has propagated.
    attempts_at = [timedelta(0)]
    for failed in range(1, rotation.MAX_VERIFY_ATTEMPTS):
        attempts_at.append(attempts_at[-1] + rotation.verify_delay(failed))
    for failed in range(4, len(attempts_at), 4):  # the block starts at the 4th, 8th... failure
        block_ends = attempts_at[failed - 1] + timedelta(minutes=failed // 4)
        assert attempts_at[failed] > block_ends + timedelta(seconds=10), attempts_at
    assert attempts_at[:5] == [timedelta(seconds=s) for s in (0, 10, 30, 70, 145)]


def test_judgement_gives_up_when_the_next_attempt_would_pass_verify_timeout() -> None:
    policy = rotation.Policy(
        max_age=timedelta(days=1),
        grace=timedelta(hours=1),
        inactive_period=timedelta(hours=1),
        check_interval=timedelta(minutes=1),
        verify_timeout=timedelta(seconds=30),
    )
    not_yet = model.VerifyResult(model.VerifyOutcome.NOT_YET, "InvalidClientTokenId")
    p1 = model.PendingKey("K", model.Secret("x" * 40), T0, attempts=1, last_attempt_at=T0)
    j1 = rotation.judge_verification(p1, not_yet, policy, T0)
    assert j1.verdict is rotation.Verdict.RETRY and j1.retry_at == T0 + timedelta(seconds=10)
    p3 = model.PendingKey(
        "K", model.Secret("x" * 40), T0, attempts=3, last_attempt_at=T0 + timedelta(seconds=30)
    )
    j3 = rotation.judge_verification(p3, not_yet, policy, T0 + timedelta(seconds=30))
    assert j3.verdict is rotation.Verdict.GIVE_UP
    assert "InvalidClientTokenId" in j3.reason
    valid = model.VerifyResult(model.VerifyOutcome.VALID, "AccessDenied")
    assert rotation.judge_verification(p3, valid, policy, T0).verdict is rotation.Verdict.PUBLISH


def test_adopting_a_foreign_key_makes_it_retire_like_our_own() -> None:
    state = model.TargetState(current=current("K1"), created_ids=("K1",))
    adopted = rotation.adopt(state, key("HAND"), POLICY, T0)
    d = rotation.decide(
        [key("K1"), key("HAND")], adopted, published("K1"), POLICY, T0 + POLICY.grace
    )
    assert d.foreign == ()
    assert [(a.kind, a.key_id) for a in d.actions] == [(ActionKind.DEACTIVATE, "HAND")]


def test_two_keys_after_an_intent_are_both_left_alone_as_they_cannot_be_told_apart() -> None:
    intent = model.Intent(T0, ("K1",))
    state = model.TargetState(current=current("K1"), intent=intent, created_ids=("K1",))
    keys = [key("K1"), model.AccessKey("X1", A, T0), model.AccessKey("X2", A, T0)]
    d = rotation.decide(keys, state, published("K1"), POLICY, T0)
    assert kinds(d) == [ActionKind.CLEAR_INTENT]
    assert set(d.foreign) == {"X1", "X2"}


def test_key_created_long_after_the_intent_is_not_its_orphan() -> None:
    intent = model.Intent(T0, ("K1",))
    state = model.TargetState(current=current("K1"), intent=intent, created_ids=("K1",))
    late = model.AccessKey("HAND", A, T0 + rotation.INTENT_WINDOW + timedelta(seconds=1))
    d = rotation.decide([key("K1"), late], state, published("K1"), POLICY, T0 + timedelta(1))
    assert kinds(d) == [ActionKind.CLEAR_INTENT]


def test_a_published_retiring_key_is_current_again_and_the_current_key_retires() -> None:
    state = model.TargetState(
        current=current("K2"),
        retiring=(model.RetiringKey("K1", T0 - timedelta(hours=1)),),
        created_ids=("K1", "K2"),
    )
    keys = [key("K1", age=timedelta(days=2)), key("K2", age=timedelta(days=1))]
    d = rotation.decide(keys, state, published("K1"), POLICY, T0)
    assert [(a.kind, a.key_id) for a in d.actions] == [(ActionKind.REINSTATE, "K1")]
    after = rotation.reinstate(state, keys[0], POLICY, T0)
    assert after.current is not None and after.current.key_id == "K1"
    assert after.retiring == (model.RetiringKey("K2", T0 + POLICY.grace, since=T0),)


def test_no_reinstatement_while_a_rotation_is_in_flight_or_of_an_inactive_key() -> None:
    pending = model.PendingKey("K3", model.Secret("pending-secret-rotation-test"), T0)
    retiring = (model.RetiringKey("K1", T0 - timedelta(hours=1)),)
    base = model.TargetState(current=current("K2"), retiring=retiring, created_ids=("K1", "K2"))
    in_flight = base.replace(pending=pending, created_ids=("K1", "K2", "K3"))
    d = rotation.decide([key("K1"), key("K2"), key("K3")], in_flight, published("K1"), POLICY, T0)
    assert ActionKind.REINSTATE not in kinds(d)
    d = rotation.decide([key("K1", I), key("K2")], base, published("K1"), POLICY, T0)
    assert ActionKind.REINSTATE not in kinds(d)
