"""The rotation protocol as pure decisions: (observed keys, state, published, policy, now) -> plan.

This module reads no clock, does no I/O and does not log. ``engine`` observes IAM and Vault,
asks :func:`decide` what to do, applies the actions in order and writes the state; after a
verification attempt it asks :func:`judge_verification` what follows.

Roles a key can have, from the rotator's point of view::

    (none) --intent--> INTENT --create+pending write--> PENDING --verified+publish--> CURRENT
    CURRENT --next key published--> RETIRING/Active --retire_at--> RETIRING/Inactive
    RETIRING/Inactive --delete_at--> deleted

Transition table (what :func:`decide` plans, in this order; "state" means the rotator state):

=====================  ==================================================  ===================
action                 when                                                effect
=====================  ==================================================  ===================
DROP_PENDING           pending key no longer in IAM, or made Inactive      state: pending=None
                       outside rotator before its publish (then deleted)
PROMOTE_PENDING        pending key is already the published one (crash     state: pending ->
                       between publish and the state write)                current, old current
                                                                           -> retiring
RESOLVE_PENDING        pending key in IAM, not published                   verify; VALID:
                                                                           publish + promote;
                                                                           NOT_YET: retry at
                                                                           backoff or delete
QUARANTINE_ORPHAN      the one key created within INTENT_WINDOW after an   IAM: Inactive; state:
                       intent marker (or MAX_CLOCK_SKEW before it), not    retiring (orphan),
                       listed before it nor tracked (secret lost in a      delete_at=now+hold
                       crash; or someone's key made then: hence the hold)
DELETE_ORPHAN          key this rotator created that is no longer          IAM: delete
                       current, pending nor retiring
CLEAR_INTENT           an intent marker with no pending key                state: intent=None
FORGET_RETIRED         retiring key no longer in IAM                       state: drop it, and
                                                                           from created_ids
REINSTATE              the published secret holds a retiring key (a KV    state: it is current
                       rollback): consumers read it                        again, the current
                                                                           key retires
DEACTIVATE             retiring key Active and now >= retire_at, while     IAM: Inactive; state:
                       the published key is Active (else it may be the     delete_at=now+inactive
                       last working key: kept Active)
RELEASE_ORPHAN         a quarantined orphan made Active again by someone   state: forgotten
                       (it is theirs)                                      (foreign from now)
REGRACE                retiring key rotator made Inactive, Active again    state: retire_at=
                       (someone undid it: a rollback)                      now+grace
SCHEDULE_DELETE        retiring key Inactive but no delete_at (someone     state: delete_at=
                       else deactivated it)                                now+inactive_period
DELETE_RETIRED         retiring key Inactive and now >= delete_at          IAM: delete; state:
                                                                           drop it
CREATE_KEY             rotation due, no pending key, a free slot           intent, create,
                                                                           pending, then resolve
BLOCKED                rotation due but no free key slot                   report, alert
=====================  ==================================================  ===================

Rules that hold whatever the inputs (property-tested):

- the published key (the id in Vault) is never the subject of DEACTIVATE or any delete;
- a foreign key (not created by this rotator, not adopted) is never deactivated or deleted;
- CREATE_KEY is planned only if, after the deletions planned before it, fewer than ``max_keys``
  keys remain;
- CREATE_KEY is never planned while a pending key exists: one rotation in flight at a time.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from rotator import model

# Verification schedule: OUTSCALE locks authentication after four failed attempts in a row, so
# the delays keep it at three attempts in the first minute (0 s, 10 s, 30 s) and 60 s apart after.
VERIFY_FIRST_DELAY = timedelta(seconds=10)
VERIFY_MAX_DELAY = timedelta(seconds=60)
MAX_VERIFY_ATTEMPTS = 8
# OUTSCALE's brute-force lock-out of a key (its API docs): see verify_delay.
LOCKOUT_AFTER = 4  # failed signatures in a row
LOCKOUT_STEP = timedelta(minutes=1)  # the block, longer by this for every LOCKOUT_AFTER more
LOCKOUT_MAX = timedelta(minutes=10)
LOCKOUT_MARGIN = timedelta(seconds=15)  # clocks and the time a call takes
# A key created for an intent appears within the CreateAccessKey call (timeouts and retries
# included), so only keys created this soon after the marker can be its orphan.
INTENT_WINDOW = timedelta(minutes=5)
# How far rotator's clock may run ahead of IAM's: the orphan's create date is IAM's time, the
# marker's started_at rotator's, so an orphan can look older than its marker by that much.
# The keys listed before the marker (``existing_ids``) are excluded whatever their dates.
MAX_CLOCK_SKEW = timedelta(minutes=5)
# How long an intent's orphan is held Inactive before it is deleted (the target's
# inactive_period when shorter): a key made by hand in the window would otherwise be deleted
# at once; made Active again meanwhile, it is released.
ORPHAN_HOLD = timedelta(minutes=10)
FAILURE_BACKOFF_MAX = timedelta(hours=1)


@dataclass(frozen=True)
class Policy:
    """The timing rules of one target (DESIGN.md section 1)."""

    max_age: timedelta
    grace: timedelta
    inactive_period: timedelta
    check_interval: timedelta
    max_keys: int = 2
    verify_timeout: timedelta = timedelta(minutes=2)


class ActionKind(enum.StrEnum):
    DROP_PENDING = "drop_pending"
    PROMOTE_PENDING = "promote_pending"
    RESOLVE_PENDING = "resolve_pending"
    DELETE_ORPHAN = "delete_orphan"
    QUARANTINE_ORPHAN = "quarantine_orphan"
    RELEASE_ORPHAN = "release_orphan"
    CLEAR_INTENT = "clear_intent"
    FORGET_RETIRED = "forget_retired"
    REINSTATE = "reinstate"
    DEACTIVATE = "deactivate"
    REGRACE = "restart_grace"
    SCHEDULE_DELETE = "schedule_delete"
    DELETE_RETIRED = "delete_retired"
    CREATE_KEY = "create_key"
    BLOCKED = "blocked"


MUTATING = frozenset(
    {
        ActionKind.RESOLVE_PENDING,
        ActionKind.DELETE_ORPHAN,
        ActionKind.QUARANTINE_ORPHAN,
        ActionKind.DEACTIVATE,
        ActionKind.DELETE_RETIRED,
        ActionKind.CREATE_KEY,
    }
)
DELETING = frozenset({ActionKind.DELETE_ORPHAN, ActionKind.DELETE_RETIRED})


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str
    key_id: str | None = None

    def describe(self) -> str:
        subject = f" {self.key_id}" if self.key_id else ""
        return f"{self.kind.value}{subject}: {self.reason}"


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    due_reason: str | None  # why a rotation is due now; None when it is not
    next_due: datetime | None  # when the next rotation becomes due (None: unknown/now)
    foreign: tuple[str, ...]  # ids of keys this rotator did not create
    blocked: str | None = None  # why a due rotation cannot proceed


class Verdict(enum.Enum):
    PUBLISH = "publish"
    RETRY = "retry"
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class VerifyJudgement:
    verdict: Verdict
    retry_at: datetime | None = None
    reason: str = ""


def decide(
    keys: Sequence[model.AccessKey],
    state: model.TargetState,
    published: model.Published,
    policy: Policy,
    now: datetime,
    *,
    force: bool = False,
    window_open: Callable[[datetime], bool] | None = None,
) -> Decision:
    """Plan one pass over a target (steps 3 to 6 of DESIGN.md section 1)."""
    by_id = {k.key_id: k for k in keys}
    published_id = published.access_key_id
    protected = {published_id} if published_id else set()
    tracked = state.tracked_ids()
    created = set(state.created_ids)
    actions: list[Action] = []
    deleted: set[str] = set()

    def delete(kind: ActionKind, key_id: str, reason: str) -> None:
        if key_id in protected or key_id in deleted:
            return
        deleted.add(key_id)
        actions.append(Action(kind, reason, key_id))

    # The published secret was rolled back to a retiring key (a KV rollback, a restore): that
    # is the key consumers read, so it is current again and the other retires. Otherwise it
    # stays protected and Active for ever and the target is blocked once a rotation is due.
    reinstated = _rolled_back_to(by_id, state, published_id)
    if reinstated is not None:
        state = reinstate(state, reinstated, policy, now)
        tracked = state.tracked_ids()
        actions.append(
            Action(
                ActionKind.REINSTATE,
                "the published secret holds this retiring key again: it is current",
                reinstated.key_id,
            )
        )

    # 3. a rotation in flight
    pending = state.pending
    pending_live = False  # a pending key to verify and publish
    in_flight = False  # a rotation is being finished: no new key in this pass
    if pending is not None:
        if pending.key_id not in by_id:
            actions.append(Action(ActionKind.DROP_PENDING, "pending key no longer in IAM"))
        elif pending.key_id != published_id and not _works(by_id, pending.key_id):
            # made Inactive by someone before it was published (a suspected leak of the state):
            # never published, whatever an earlier verification said; a fresh key replaces it
            actions.append(Action(ActionKind.DROP_PENDING, "pending key was made Inactive"))
            delete(
                ActionKind.DELETE_ORPHAN,
                pending.key_id,
                "pending key was made Inactive outside rotator before it was published",
            )
        elif pending.key_id == published_id:
            in_flight = True
            if pending.replaces:  # promote() gives it a full grace from now: not retired now
                protected.add(pending.replaces)
            actions.append(
                Action(
                    ActionKind.PROMOTE_PENDING,
                    "pending key is already published: finish the interrupted rotation",
                    pending.key_id,
                )
            )
        else:
            pending_live = in_flight = True

    # 4. clean up after crashes
    orphans_of_intent: set[str] = set()
    if state.intent is not None and not pending_live:
        started = model.whole_seconds(state.intent.started_at)
        candidates = [
            key.key_id
            for key in keys
            if key.key_id not in tracked
            and key.key_id not in created
            and key.key_id not in state.intent.existing_ids
            and started - MAX_CLOCK_SKEW
            <= model.whole_seconds(key.created)
            <= started + INTENT_WINDOW
        ]
        # One intent creates at most one key: with two candidates one is someone else's and
        # they cannot be told apart, so none is deleted (both stay, counted as foreign).
        if len(candidates) == 1 and candidates[0] not in protected:
            orphans_of_intent.add(candidates[0])
            actions.append(
                Action(
                    ActionKind.QUARANTINE_ORPHAN,
                    "created by an interrupted rotation, its secret never stored (or made by "
                    "hand at that moment): Inactive now, deleted after a hold",
                    candidates[0],
                )
            )
        actions.append(Action(ActionKind.CLEAR_INTENT, "no rotation in flight"))
    for key in keys:
        if key.key_id in created and key.key_id not in tracked:
            delete(
                ActionKind.DELETE_ORPHAN,
                key.key_id,
                "created by rotator but no longer current, pending nor retiring",
            )

    # 5. retire; while the published key does not work (made Inactive or deleted outside
    # rotator) a retiring key may be the last one that does: it stays Active until one is again
    # (a secret deleted, or holding no key of the user, is no such case: consumers that read it
    # before hold the current key, which works; the retiring ones had their grace)
    published_works = _works(by_id, published_id) or (
        published_id not in by_id
        and state.current is not None
        and _works(by_id, state.current.key_id)
    )
    for retiring in state.retiring:
        retiring_key = by_id.get(retiring.key_id)
        if retiring_key is None:
            actions.append(
                Action(ActionKind.FORGET_RETIRED, "retiring key no longer in IAM", retiring.key_id)
            )
        elif retiring.orphan and retiring_key.status is model.KeyStatus.ACTIVE:
            actions.append(
                Action(
                    ActionKind.RELEASE_ORPHAN,
                    "taken for an interrupted rotation's orphan, made Active again by someone: "
                    "theirs, left alone as foreign",
                    retiring.key_id,
                )
            )
        elif retiring.key_id in protected:
            continue  # the published key is never retired, whatever the state says
        elif retiring_key.status is model.KeyStatus.ACTIVE:
            if retiring.deactivated_at is not None:  # rotator made it Inactive: a person undid it
                actions.append(
                    Action(
                        ActionKind.REGRACE,
                        "made Active again outside rotator: a new grace period from now",
                        retiring.key_id,
                    )
                )
            elif now >= retire_deadline(retiring, policy) and published_works:
                actions.append(
                    Action(ActionKind.DEACTIVATE, "grace period is over", retiring.key_id)
                )
        elif retiring.delete_at is None:
            actions.append(
                Action(
                    ActionKind.SCHEDULE_DELETE,
                    "retiring key was made Inactive outside rotator",
                    retiring.key_id,
                )
            )
        else:
            deadline = delete_deadline(retiring, policy)
            if deadline is not None and now >= deadline:
                delete(ActionKind.DELETE_RETIRED, retiring.key_id, "inactive period is over")

    foreign = tuple(
        k.key_id
        for k in keys
        if k.key_id not in created and k.key_id not in tracked and k.key_id not in orphans_of_intent
    )

    # 6. rotate when due
    due_reason, next_due = _due(by_id, state, published, policy, now, force, window_open)
    if pending_live and pending is not None:
        actions.append(
            Action(ActionKind.RESOLVE_PENDING, "a new key awaits verification", pending.key_id)
        )
    if in_flight:
        return Decision(tuple(actions), due_reason, next_due, foreign)
    if due_reason is None:
        return Decision(tuple(actions), None, next_due, foreign)

    remaining = [k for k in keys if k.key_id not in deleted]
    if len(remaining) >= policy.max_keys:
        blocked = _blocked_reason(remaining, state, foreign, policy, by_id, published_id)
        if not due_reason.startswith(("current key reached max_age", "no current key")):
            blocked = f"{blocked} (a new key is needed now: {due_reason})"  # consumers may fail
        actions.append(Action(ActionKind.BLOCKED, blocked))
        return Decision(tuple(actions), due_reason, next_due, foreign, blocked)
    actions.append(Action(ActionKind.CREATE_KEY, due_reason))
    return Decision(tuple(actions), due_reason, next_due, foreign)


def stale_pending(
    keys: Sequence[model.AccessKey], state: model.TargetState, published_id: str | None
) -> str | None:
    """Why the state's pending key must not be published (None: it may): the secret holds a
    newer key than it, which the state does not know of. A state rolled back to a version
    written during an old rotation looks so; publishing would put an older key back in front
    of consumers and leave the newer one foreign, Active for ever."""
    pending = state.pending
    if pending is None or published_id is None or published_id in state.tracked_ids():
        return None
    if published_id == pending.replaces:
        return None
    by_id = {k.key_id: k for k in keys}
    if not _works(by_id, pending.key_id):
        return None  # gone (deleted by hand, as the error says) or Inactive: never published
    published = by_id.get(published_id)
    if published is None or published.created <= pending.created:
        return None
    return (
        f"the state's pending key {pending.key_id} (made {model.format_time(pending.created)}) "
        f"is older than the published key {published_id} (made "
        f"{model.format_time(published.created)}), which the state does not track: the state "
        "looks rolled back, or the key was published by hand during the rotation. rotator will "
        "not publish the older key over it. Put the latest version of the state back (`bao kv "
        "rollback`); or, if the published key is to stay, delete the pending key by hand: the "
        "next pass forgets it"
    )


def retire_deadline(retiring: model.RetiringKey, policy: Policy) -> datetime:
    """When a retiring key may be made Inactive: the deadline set when it began to retire, or
    later if a reload has lengthened grace since (a shorter grace never cuts a given one)."""
    if retiring.since is None:
        return retiring.retire_at
    return max(retiring.retire_at, retiring.since + policy.grace)


def delete_deadline(retiring: model.RetiringKey, policy: Policy) -> datetime | None:
    """When an Inactive retiring key may be deleted (None: not scheduled): as above, for
    inactive_period counted from the deactivation."""
    if retiring.delete_at is None or retiring.deactivated_at is None or retiring.orphan:
        return retiring.delete_at  # an orphan's hold is not an inactive_period
    return max(retiring.delete_at, retiring.deactivated_at + policy.inactive_period)


def deadlines_in_force(
    retiring: tuple[model.RetiringKey, ...], policy: Policy
) -> tuple[model.RetiringKey, ...]:
    """The retiring keys with the deadlines in force stored (lengthened ones kept)."""
    return tuple(
        dataclasses.replace(
            r, retire_at=retire_deadline(r, policy), delete_at=delete_deadline(r, policy)
        )
        for r in retiring
    )


def _rolled_back_to(
    by_id: dict[str, model.AccessKey], state: model.TargetState, published_id: str | None
) -> model.AccessKey | None:
    """The retiring key the published secret holds, if it is Active and no rotation is in
    flight; None otherwise."""
    if state.pending is not None or state.current is None or published_id is None:
        return None
    if published_id == state.current.key_id:
        return None
    key = by_id.get(published_id)
    retiring = {r.key_id: r for r in state.retiring}.get(published_id)
    if key is None or retiring is None or key.status is not model.KeyStatus.ACTIVE:
        return None
    if retiring.orphan:
        return None  # never verified by rotator: released as foreign instead
    return key


def reinstate(
    state: model.TargetState, key: model.AccessKey, policy: Policy, now: datetime
) -> model.TargetState:
    """The state once the retiring ``key``, published again, is current: the current key
    retires (a full grace: consumers may have read it before the rollback)."""
    old = state.current
    retiring = [r for r in state.retiring if r.key_id != key.key_id]
    if old is not None:
        retiring.append(
            model.RetiringKey(key_id=old.key_id, retire_at=now + policy.grace, since=now)
        )
    return state.replace(
        current=model.CurrentKey(
            key_id=key.key_id, created=key.created, published_at=now, verified_at=now
        ),
        retiring=tuple(retiring),
    )


def _due(
    by_id: dict[str, model.AccessKey],
    state: model.TargetState,
    published: model.Published,
    policy: Policy,
    now: datetime,
    force: bool,
    window_open: Callable[[datetime], bool] | None,
) -> tuple[str | None, datetime | None]:
    """Why a new key is needed now (None if not) and when the next one is due."""
    current = state.current
    next_due = None if current is None else current.created + policy.max_age
    if force:
        return "forced by operator", next_due
    if current is None:
        reason = "no current key (first key for this target)"
    elif current.key_id not in by_id:
        reason = "current key is gone from IAM"
    elif by_id[current.key_id].status is model.KeyStatus.INACTIVE:
        reason = "current key is Inactive in IAM"
    elif published.access_key_id is None and published.version > 0:
        # deleted (`kv delete`, or Vault's delete_version_after: then again after each write)
        reason = (
            f"the published secret's latest version ({published.version}) holds no key: it was "
            "deleted (a `kv delete`, or delete_version_after on the mount or path) or overwritten"
        )
    elif published.access_key_id is None or published.access_key_id not in by_id:
        reason = "the published secret does not hold a key that exists in IAM"
    elif by_id[published.access_key_id].status is model.KeyStatus.INACTIVE:
        # an older, retired key (the secret restored, or its path moved back): consumers fail
        reason = "the published secret holds an Inactive key"
    elif (broken := published_secret_problem(state, published)) is not None:
        reason = broken
    elif next_due is not None and now >= next_due:
        if window_open is not None and not window_open(now):
            return None, next_due
        reason = "current key reached max_age"
    else:
        return None, next_due
    if state.retry_after is not None and now < state.retry_after:
        return None, state.retry_after
    return reason, next_due


def published_secret_problem(state: model.TargetState, published: model.Published) -> str | None:
    """Why consumers cannot sign with the published secret although its key id is a working
    key (edited by hand), or None. The secret itself is never read back: its digest is
    compared with the one the state keeps of the current key's, from its verification."""
    if published.secret_missing:
        return (
            f"the published secret holds key {published.access_key_id} but no usable "
            "secret_access_key (absent, empty or not a string): consumers cannot sign with it"
        )
    current = state.current
    if (
        current is not None
        and published.access_key_id == current.key_id
        and current.secret_digest is not None
        and published.secret_digest is not None
        and published.secret_digest != current.secret_digest
    ):
        return (
            f"the published secret's secret_access_key is not the one of key {current.key_id} "
            "that rotator verified (edited by hand?): consumers cannot sign with it"
        )
    return None


def _works(by_id: dict[str, model.AccessKey], key_id: str | None) -> bool:
    key = by_id.get(key_id) if key_id else None
    return key is not None and key.status is model.KeyStatus.ACTIVE


def _blocked_reason(
    remaining: Sequence[model.AccessKey],
    state: model.TargetState,
    foreign: tuple[str, ...],
    policy: Policy,
    by_id: dict[str, model.AccessKey],
    published_id: str | None,
) -> str:
    retiring = [r.key_id for r in state.retiring]
    parts = [f"{len(remaining)} keys of max_keys {policy.max_keys} in use"]
    if state.current:
        parts.append(f"current {state.current.key_id}")
    if retiring:
        parts.append("retiring " + ", ".join(retiring))
    if foreign:
        parts.append("foreign " + ", ".join(foreign))
    if foreign:
        hint = (
            "foreign keys are never removed automatically: delete one by hand or hand it over "
            "with `rotator adopt`"
        )
    elif published_id in by_id and not _works(by_id, published_id):
        hint = (
            f"the published key {published_id} is Inactive (made so outside rotator) and "
            "rotator never deletes the published key: make it Active again, or delete it by "
            "hand to free its slot; the retiring keys stay Active meanwhile"
        )
    else:
        hint = _slot_frees(state, policy, by_id)
    return f"no free key slot ({'; '.join(parts)}): {hint}"


def _slot_frees(state: model.TargetState, policy: Policy, by_id: dict[str, model.AccessKey]) -> str:
    """When the first retiring key is due to be deleted, and what to do to rotate sooner."""
    deletions = []
    for r in state.retiring:
        key = by_id.get(r.key_id)
        if key is None:
            continue
        if key.status is model.KeyStatus.ACTIVE:
            deletions.append((retire_deadline(r, policy) + policy.inactive_period, r.key_id))
        else:
            deadline = delete_deadline(r, policy)
            if deadline is not None:
                deletions.append((deadline, r.key_id))
    when = ""
    if deletions:
        at, key_id = min(deletions)
        when = f"{key_id} is due to be deleted at {model.format_time(at)}, freeing a slot; "
    return (
        f"{when}to rotate sooner, delete a retiring key by hand once nobody uses it (rotator "
        "forgets a retiring key IAM no longer lists; a shorter grace or inactive_period never "
        "cuts a deadline already set)"
    )


def due_by_age(state: model.TargetState, policy: Policy) -> datetime | None:
    """When the current key reaches max_age, whatever a backoff says; None: no key yet."""
    return None if state.current is None else state.current.created + policy.max_age


def next_due(state: model.TargetState, policy: Policy) -> datetime | None:
    """When the next rotation is due by age (or by backoff); None: as soon as possible."""
    due = due_by_age(state, policy)
    if state.retry_after is not None and (due is None or state.retry_after > due):
        return state.retry_after
    return due


def verify_delay(attempts: int, *, uncounted: bool = False) -> timedelta:
    """The wait before the next verification attempt, after ``attempts`` failed ones.

    OUTSCALE blocks a key for a minute after four failed signatures in a row, and a minute
    more for every four more (ten at most); an attempt inside the block fails whatever the
    key, and a key that has propagated would be given up. So after each fourth failure the
    wait outlasts the block."""
    if uncounted:  # one more attempt may have been made: the longer of both waits
        return max(verify_delay(attempts), verify_delay(attempts + 1))
    if attempts <= 0:
        return timedelta(0)
    delay: timedelta = min(VERIFY_FIRST_DELAY * (2 ** min(attempts - 1, 16)), VERIFY_MAX_DELAY)
    if attempts % LOCKOUT_AFTER == 0:
        block = min(LOCKOUT_STEP * (attempts // LOCKOUT_AFTER), LOCKOUT_MAX)
        delay = max(delay, block + LOCKOUT_MARGIN)
    return delay


def verify_attempts(policy: Policy) -> int:
    """How many verification attempts fit in ``verify_timeout`` (the first one included)."""
    attempts, elapsed = 1, timedelta(0)
    while attempts < MAX_VERIFY_ATTEMPTS:
        elapsed += verify_delay(attempts)
        if elapsed > policy.verify_timeout:
            break
        attempts += 1
    return attempts


def next_verify_at(pending: model.PendingKey) -> datetime:
    """When the pending key may be tried again (at once if it was never tried)."""
    if pending.last_attempt_at is None:
        return pending.verify_from
    return pending.last_attempt_at + verify_delay(pending.attempts, uncounted=pending.uncounted)


def judge_verification(
    pending: model.PendingKey,
    result: model.VerifyResult,
    policy: Policy,
    now: datetime,
) -> VerifyJudgement:
    """After an attempt (already counted in ``pending.attempts``): publish, retry, or give up."""
    if result.outcome is model.VerifyOutcome.VALID:
        return VerifyJudgement(Verdict.PUBLISH, reason="the new key authenticated")
    retry_at = now + verify_delay(pending.attempts, uncounted=pending.uncounted)
    if (
        pending.attempts >= MAX_VERIFY_ATTEMPTS
        or retry_at > pending.verify_from + policy.verify_timeout
    ):
        return VerifyJudgement(
            Verdict.GIVE_UP,
            reason=(
                f"new key never authenticated ({result.detail or 'refused'}) after "
                f"{pending.attempts} attempts within verify_timeout (the attempts wait out "
                "OUTSCALE's lock-out after four failures in a row; a slower propagation needs "
                "a longer verify_timeout)"
            ),
        )
    return VerifyJudgement(Verdict.RETRY, retry_at, f"not accepted yet ({result.detail})")


def failure_backoff(failures: int, policy: Policy) -> timedelta:
    """How long to wait before a fresh key after ``failures`` failed rotations in a row."""
    base = max(policy.check_interval, timedelta(seconds=1))
    delay: timedelta = base * (2 ** min(max(failures - 1, 0), 16))
    return min(delay, max(FAILURE_BACKOFF_MAX, base))


def promote(
    state: model.TargetState,
    pending: model.PendingKey,
    policy: Policy,
    now: datetime,
    *,
    replaced: str | None = None,
) -> model.TargetState:
    """The state once ``pending`` is published: it becomes current, the old current retires.

    ``replaced`` is the key that was published until now. Consumers may still be reading it, so
    it stays Active a full grace from now, also when it was retiring already (an adopted key
    that was published: its grace counted from the adoption, and it was protected since).
    """
    retiring = list(state.retiring)
    old = state.current
    if old is not None and old.key_id != pending.key_id:
        retiring = [r for r in retiring if r.key_id != old.key_id]
        retiring.append(
            model.RetiringKey(key_id=old.key_id, retire_at=now + policy.grace, since=now)
        )
    if replaced is not None and replaced != pending.key_id:
        retiring = [
            model.RetiringKey(r.key_id, retire_at=max(r.retire_at, now + policy.grace), since=now)
            if r.key_id == replaced and r.deactivated_at is None
            else r
            for r in retiring
        ]
    return state.replace(
        current=model.CurrentKey(
            key_id=pending.key_id,
            created=pending.created,
            published_at=now,
            verified_at=pending.last_attempt_at or now,
            secret_digest=model.secret_digest(pending.secret.reveal()),
        ),
        retiring=tuple(r for r in retiring if r.key_id != pending.key_id),
        pending=None,
        intent=None,
        last_rotation_at=now,
        failures=0,
        retry_after=None,
        last_error=None,
    ).remember_created(pending.key_id)


def quarantined(
    state: model.TargetState, key_id: str, policy: Policy, now: datetime
) -> model.TargetState:
    """The state once an intent's orphan is Inactive, held before its deletion."""
    hold = min(policy.inactive_period, ORPHAN_HOLD)
    held = model.RetiringKey(
        key_id=key_id,
        retire_at=now,
        deactivated_at=now,
        delete_at=now + hold,
        since=now,
        orphan=True,
    )
    return state.replace(
        retiring=(*(r for r in state.retiring if r.key_id != key_id), held), intent=None
    )


def deactivated(
    state: model.TargetState, key_id: str, policy: Policy, now: datetime
) -> model.TargetState:
    """The state once a retiring key is Inactive: it will be deleted after inactive_period."""
    return state.replace(
        retiring=tuple(
            dataclasses.replace(r, deactivated_at=now, delete_at=now + policy.inactive_period)
            if r.key_id == key_id
            else r
            for r in state.retiring
        )
    )


def regraced(
    state: model.TargetState, key_id: str, policy: Policy, now: datetime
) -> model.TargetState:
    """The state once a retiring key made Inactive was made Active again by hand (a rollback,
    the runbook's): it retires anew, grace from now, rather than being deactivated at once."""
    return state.replace(
        retiring=tuple(
            model.RetiringKey(key_id=r.key_id, retire_at=now + policy.grace, since=now)
            if r.key_id == key_id
            else r
            for r in state.retiring
        )
    )


def forget_retiring(state: model.TargetState, key_id: str) -> model.TargetState:
    return state.replace(retiring=tuple(r for r in state.retiring if r.key_id != key_id))


def forget_gone(state: model.TargetState, key_id: str) -> model.TargetState:
    """A retiring key IAM no longer lists is forgotten, and no longer counted as one rotator
    made: it was published, so if it is listed again (IAM pointed at another account for a
    while, then back) consumers may hold it, and it is left alone as foreign, never taken for an
    orphan to delete at once."""
    return forget_retiring(state, key_id).replace(
        created_ids=tuple(i for i in state.created_ids if i != key_id)
    )


def adopt(
    state: model.TargetState, key: model.AccessKey, policy: Policy, now: datetime
) -> model.TargetState:
    """Take over a foreign key: it retires through grace, Inactive, delete like our own."""
    retiring = model.RetiringKey(key_id=key.key_id, retire_at=now + policy.grace, since=now)
    if key.status is model.KeyStatus.INACTIVE:
        retiring = model.RetiringKey(
            key_id=key.key_id,
            retire_at=now,
            deactivated_at=now,
            delete_at=now + policy.inactive_period,
            since=now,
        )
    return state.replace(retiring=(*state.retiring, retiring)).remember_created(key.key_id)
