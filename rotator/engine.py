"""One pass over one target: observe, decide, apply step by step, report.

The engine is where decisions (``rotation``, ``identity``) meet the ports (``Identity`` for
EIM, ``SecretStore`` for Vault). It keeps nothing between passes that matters: everything is
observed again and the state is written to Vault with check-and-set, so a crash at any point
leaves a state the next pass continues from.

Order rules that keep operators from being locked out:

- Vault is read before any IAM change; if it cannot be read nothing else happens;
- the intent marker is stored before CreateAccessKey, the pending key (with its secret) right
  after, and a key whose secret could not be stored is deleted at once;
- only a key that verified is published; the published key is never deactivated or deleted.

This is one of the two places that catch broadly (per target); the other is the daemon's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog

from rotator import errors, identity, model, ports, rotation

log = structlog.get_logger("rotator.engine")

T = TypeVar("T")


@dataclass(frozen=True)
class TargetSpec:
    """What the engine needs to know of a configured target."""

    name: str
    user: str
    secret_path: str
    policy: rotation.Policy
    desired: identity.Desired | None = None  # None: identities are managed elsewhere
    identity_check_interval: timedelta = timedelta(hours=1)
    window_open: Callable[[datetime], bool] | None = None


class RetiringPhase(enum.Enum):
    """Where a retiring key is, as `rotator status` says it."""

    GRACE = "grace (Active)"
    INACTIVE = "Inactive"
    HELD = "held Inactive (orphan)"  # an interrupted rotation's orphan, or a key made by hand then
    GONE = "gone"  # IAM no longer lists it
    UNKNOWN = "IAM not read"

    @property
    def next_step(self) -> str | None:
        """What the key becomes at the end of this phase."""
        return {
            RetiringPhase.GRACE: "Inactive",
            RetiringPhase.INACTIVE: "deleted",
            RetiringPhase.HELD: "deleted",
        }.get(self)


@dataclass(frozen=True)
class StatusView:
    """What `rotator status` shows for one target."""

    target: str
    user: str
    secret_path: str
    published_key_id: str | None
    current_key_id: str | None
    current_created: datetime | None
    next_due: datetime | None
    due_reason: str | None
    pending_key_id: str | None
    retiring: tuple[tuple[str, RetiringPhase, datetime | None], ...]  # key, phase, moves on at
    foreign: tuple[str, ...]
    keys: tuple[model.AccessKey, ...]
    blocked: str | None
    last_error: str | None
    last_rotation_at: datetime | None
    failures: int


@dataclass(frozen=True)
class UnconfiguredView:
    """A state of a target the config no longer names that still tracks keys (what the
    daemon's warning and `rotator status` tell of it)."""

    target: str
    user: str | None
    current_key_id: str | None
    retiring_key_ids: tuple[str, ...]
    pending_key_id: str | None
    heir: str | None  # the configured target with its user: its next pass carries the state on

    def keys(self) -> list[str]:
        """Each tracked key with its role, as ``AKIA... (retiring)``."""
        current = [f"{self.current_key_id} (current)"] if self.current_key_id else []
        pending = [f"{self.pending_key_id} (pending)"] if self.pending_key_id else []
        return current + [f"{k} (retiring)" for k in self.retiring_key_ids] + pending

    @property
    def fate(self) -> str:
        """What becomes of its keys, and what to do."""
        if self.heir is not None:
            return (
                f"target {self.heir} has the same user: its next pass carries this state on "
                "(a rename), unless it has a state of its own"
            )
        return (
            "its keys are no longer rotated nor retired: put the target back in the config to "
            "finish retiring them"
        )


# What a pass's transient failure (throttling, a timeout, Vault away) says becomes of it: in
# the daemon; a one-shot command (`run --once`, `rotate`) has no next pass of its own.
RETRIED_BY_THE_DAEMON = "retried on the next pass"
RETRIED_BY_HAND = "transient: run the command again later"

SHARED_READS_MAX_AGE = timedelta(seconds=60)  # of a group or policy read, for other targets
# How old the pass's key listing may be when an intent marker is written from it: a key made by
# hand after the listing and before the marker could otherwise be taken for the marker's orphan.
KEYS_FRESH_FOR = timedelta(seconds=1)
# The share of a lease's TTL after its last renewal the holder still trusts it (the rest is a
# margin for the clocks of the replicas and the time a change takes).
LEASE_TRUSTED_FOR = 0.8
ADOPT_TRIES = 3  # an adoption's state writes, each over a state read again after a conflict
# How many earlier versions of a published secret a restore looks through (Vault keeps 10).
RESTORE_LOOKBACK = 10


class _SharedReads:
    """Reads of groups and policies, shared by every target that names them for a while.

    A fleet's targets usually share one group and one policy: reading them for each target
    would make a sweep cost targets x calls. A failed read is not kept; a change the engine
    makes forgets what it changed. One read per key at a time: workers asking for it meanwhile
    wait for that answer rather than asking too.
    """

    def __init__(self, clock: ports.Clock) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[datetime, object]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def get(
        self, key: tuple[str, str], read: Callable[[], T], max_age: timedelta, *, fresh: bool
    ) -> T:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            entry = self._entries.get(key)
            now = self._clock.now()
            if not fresh and entry is not None and timedelta(0) <= now - entry[0] < max_age:
                return entry[1]  # type: ignore[return-value]  # stored by this same key's read
            value = read()
            self._entries[key] = (self._clock.now(), value)
            return value

    def forget(self, *keys: tuple[str, str]) -> None:
        with self._guard:
            for key in keys:
                self._entries.pop(key, None)


class Stopped(Exception):
    """A stop was requested: the pass ends between two steps, its state already written."""


class LockHeld(Exception):
    """Another replica holds the target's lease: this pass leaves the target to it."""

    def __init__(self, holder: str) -> None:
        self.holder = holder
        super().__init__(holder)


class _Lease:
    """A held lease; the engine's renewer renews it every third of its TTL until it is dropped.

    When a renewal fails, ``lost`` is set and the pass stops before its next mutating step;
    state writes are fenced by check-and-set anyway, so a stale holder cannot overwrite.
    """

    def __init__(self, target: str, ttl: float) -> None:
        self.target, self.ttl = target, ttl
        self.lost = threading.Event()
        self.resumed = False  # nobody wrote the lock since this engine's last write to it
        self.renew_at = time.monotonic() + ttl / 3
        self.busy = threading.Lock()  # held while a renewal is in flight
        self.dropped = False

    def expired(self) -> bool:
        """No renewal for most of the TTL (the renewer stuck on a call, or starved): another
        replica may take the lease soon, so it counts as lost before it is."""
        renewed = self.renew_at - self.ttl / 3
        return time.monotonic() - renewed > self.ttl * LEASE_TRUSTED_FOR


class _Renewer:
    """One thread renewing every lease an engine holds, each every third of its TTL.

    A thread per lease cost every pass a thread start and a join, about 15 ms of wall time each
    under a busy GIL. Leases come and go with the passes; the thread stays while there are any
    (and a minute after, so that a replaced engine leaves no thread behind). Renewals are made
    one after another: they all go to the same Vault, and a renewal slow enough to delay the
    others past a third of the TTL means the leases are at risk anyway.
    """

    IDLE_EXIT_SECONDS = 60.0

    def __init__(self, lock: ports.Lock, holder: str) -> None:
        self._lock, self._holder = lock, holder
        self._changed = threading.Condition()
        self._leases: dict[int, _Lease] = {}
        self._thread: threading.Thread | None = None

    def add(self, lease: _Lease) -> None:
        with self._changed:
            self._leases[id(lease)] = lease
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)
                self._thread.start()
            self._changed.notify()

    def drop(self, lease: _Lease) -> None:
        """No more renewals of ``lease``; waits for one in flight, so a release comes after it."""
        with lease.busy:
            lease.dropped = True
        with self._changed:
            self._leases.pop(id(lease), None)

    def _run(self) -> None:
        while True:
            with self._changed:
                if not self._leases:
                    self._changed.wait(self.IDLE_EXIT_SECONDS)
                    if not self._leases:
                        self._thread = None
                        return
                now = time.monotonic()
                due = [lease for lease in self._leases.values() if lease.renew_at <= now]
                if not due:
                    self._changed.wait(min(x.renew_at for x in self._leases.values()) - now)
                    continue
            for lease in due:
                self._renew(lease)

    def _renew(self, lease: _Lease) -> None:
        with lease.busy:
            if lease.dropped:
                return
            try:
                if self._lock.renew(lease.target, self._holder, lease.ttl):
                    lease.renew_at = time.monotonic() + lease.ttl / 3
                    return
                reason = "taken over or expired"
            except errors.RotatorError as exc:
                reason = str(exc)
            except Exception as exc:  # a bug must not end the renewals of every other lease
                reason = f"internal error: {type(exc).__name__}: {exc}"
            lease.dropped = True
        log.warning("lock_lost", target=lease.target, reason=reason)
        lease.lost.set()
        with self._changed:
            self._leases.pop(id(lease), None)


@dataclass
class _Pass:
    """The mutable bookkeeping of one pass (never shared between threads)."""

    spec: TargetSpec
    stored: model.StoredState
    published: model.Published
    keys: dict[str, model.AccessKey] = field(default_factory=dict)
    state: model.TargetState = field(default_factory=model.TargetState)
    actions: list[str] = field(default_factory=list)
    components: list[str] = field(default_factory=list)
    rotated: bool = False  # a promotion this pass wrote to the state
    published_new: bool = False  # this pass published a new key (its state write may fail)
    rotation_failed: bool = False
    blocked: str | None = None
    decision: rotation.Decision | None = None
    keys_observed: bool = False
    keys_listed_at: datetime | None = None  # when p.keys was listed (the clock's time)
    user_missing: bool = False
    identity_due: bool = False  # the identity needs changes: made under the lease
    lease: _Lease | None = None


class Engine:
    """Runs passes; holds the ports and the clock, and which targets had their identity checked."""

    def __init__(
        self,
        identity_port: ports.Identity,
        store: ports.SecretStore,
        clock: ports.Clock,
        *,
        dry_run: bool = False,
        lock: ports.Lock | None = None,
        lock_ttl: float = 15.0,
        holder: str | None = None,
        configured: Iterable[str] | None = None,
        retry_note: str = RETRIED_BY_THE_DAEMON,
    ) -> None:
        self._iam = identity_port
        self._retry_note = retry_note  # what a pass's transient failure says becomes of it
        self._store = store
        self._clock = clock
        self._dry_run = dry_run
        self._lock = lock
        self._lock_ttl = lock_ttl
        self._holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # target -> when this engine last checked its identity (every target once at start)
        self._identity_checked: dict[str, datetime] = {}
        self._shared = _SharedReads(clock)
        self._renewer = None if lock is None else _Renewer(lock, self._holder)
        # states of targets the config does not name (see unconfigured()): a configured target
        # without a state of its own whose user one of them tracks is that target renamed.
        # Looked for once, at the first call or the first pass that finds no state; not at all
        # when ``configured`` (the names the config gives) is None.
        self._configured = frozenset(configured or ())
        self._unconfigured: dict[str, model.StoredState] | None = None if configured else {}
        self._scan_lock = threading.Lock()
        # policy name -> the document (canonical JSON) this engine last made its default
        self._policies_set: dict[str, str] = {}
        # ("group" | "policy", name) -> held while a pass changes that shared entity: the
        # targets sharing it, in this engine's workers, change it one at a time
        self._shared_changing: dict[tuple[str, str], threading.Lock] = {}
        # target -> (pending key, attempts) as this engine last counted them
        self._attempts_made: dict[str, tuple[str, int]] = {}
        self._scan_denied: str | None = None  # why the states could not be listed
        self._unlisted_warned: set[str] = set()

    # --- the pass ------------------------------------------------------------------------

    def run_pass(
        self,
        spec: TargetSpec,
        *,
        force: bool = False,
        check_identity: bool = False,
        lock_wait: float = 0.0,
    ) -> model.PassReport:
        """One pass over one target; never raises (errors are in the report).

        The pass observes without the lock; only when there is something to do does it take
        the target's lease, observe again (fresh versions for check-and-set) and act.
        ``force``: rotate the key whatever its age; ``check_identity``: check the user, group
        and policy whatever the schedule (`rotator rotate` asks for both).
        ``lock_wait``: how long to wait for a lease another replica holds (0: skip the target).
        """
        started = time.perf_counter()
        bound = log.bind(target=spec.name)
        p: _Pass | None = None
        error: str | None = None
        skipped: str | None = None
        components: list[str] = []
        try:
            p = self._observe_vault(spec)
            self._observe_keys(p)
            if self._needs_work(p, force=force, check_identity=check_identity):
                if self._lock is None or self._dry_run:
                    self._work(p, force=force)
                else:
                    with self._leased(spec, lock_wait) as lease:
                        if not lease.resumed:
                            p = self._reobserve(p)
                        p.lease = lease
                        self._work(p, force=force)
        except LockHeld as held:
            skipped = f"lock held by {held.holder}"
            bound.debug("pass_skipped", reason=skipped)
        except Stopped:
            error = "pass interrupted by shutdown; the next pass continues from the stored state"
            bound.info("pass_stopped", reason="stop requested")
        except errors.RotatorError as exc:
            error = f"{exc}; {self._retry_note}" if exc.transient else str(exc)
            components.append(exc.component)
            if (
                p is not None
                and p.decision is not None
                and p.decision.due_reason is not None
                and not p.published_new  # published: the next pass finishes it, no failure
            ):
                p.rotation_failed = True
            bound.warning("pass_failed", error=error, component=exc.component)
            self._record_failure(p, error)
        except Exception as exc:  # one target's bug must not stop the others
            error = f"internal error: {type(exc).__name__}: {exc}"
            components.append("other")
            bound.exception("pass_crashed", error=error)
            self._record_failure(p, error)
        report = self._report(spec, p, error, components, time.perf_counter() - started, skipped)
        if skipped is None:
            bound.info(
                "pass_summary",
                ok=report.ok,
                rotated=report.rotated,
                blocked=report.blocked,
                published_key_id=report.published_key_id,
                next_due=None if report.next_due is None else model.format_time(report.next_due),
                keys_active=report.keys_active,
                keys_inactive=report.keys_inactive,
                foreign_keys=report.foreign_keys,
                actions=list(report.actions),
                error=report.error,
                duration_ms=round(report.duration_seconds * 1000, 1),
                dry_run=self._dry_run,
            )
        return report

    def _observe_vault(self, spec: TargetSpec) -> _Pass:
        # Vault first: without it no IAM change may happen.
        stored = self._state_of(spec)
        published = self._store.read_published(spec.secret_path)
        p = _Pass(spec=spec, stored=stored, published=published, state=_owned(spec, stored))
        if stored.carried_from is not None:
            p.actions.append(
                f"carry_over {stored.carried_from}: the target was renamed {spec.name} (same "
                f"user); its state is carried on and {stored.carried_from}'s marked renamed"
            )
        return p

    def _observe_keys(self, p: _Pass) -> None:
        try:
            keys = self._iam.list_keys(p.spec.user)
        except errors.EimNoSuchEntity:
            if p.spec.desired is None:
                raise errors.EimNoSuchEntity(
                    _missing_user(p.spec),
                    code="NoSuchEntity",
                    action="ListAccessKeys",
                ) from None
            keys = []  # the identity check creates the user first
            p.user_missing = True
        p.keys = {k.key_id: k for k in keys}
        p.keys_observed = True
        p.keys_listed_at = self._clock.now()

    def _reobserve(self, p: _Pass) -> _Pass:
        """What the pass must see once it holds a lease another holder may have had since the
        observation: the state again (its version fences the writes). When that version is the
        one observed before, no replica acted in between (every change rotator makes writes the
        state), so the keys and secret read are current. A resumed lease needs not even that:
        nobody held it since this engine released it, before this pass observed."""
        stored = self._store.read_state(p.spec.name)
        if stored.version == p.stored.version:
            return p
        fresh = _Pass(
            spec=p.spec,
            stored=stored,
            published=self._store.read_published(p.spec.secret_path),
            state=_owned(p.spec, stored),
            identity_due=p.identity_due,
        )
        self._observe_keys(fresh)
        return fresh

    def _needs_work(self, p: _Pass, *, force: bool, check_identity: bool) -> bool:
        """Whether this pass must act (and so take the lock): nothing to do on an idle pass.

        A due identity check is an observation too: only when it finds something to change
        does the pass take the lock (and observe the identity again under it)."""
        if p.user_missing:
            p.identity_due = True
            return True
        if self._identity_due(p, force=check_identity):
            changes, _ = self._observe_identity(p, fresh=check_identity)
            if changes:
                p.identity_due = True
                return True
            self._identity_checked_now(p)
        p.decision = self._decide(p, force=force)
        return bool(p.decision.actions) or self._outcome(p) != p.stored.state

    def _work(self, p: _Pass, *, force: bool) -> None:
        self._check_account(p)
        if p.identity_due:
            self._ensure_identity(p)
        if p.user_missing and not self._dry_run:
            p.user_missing = False
            self._observe_keys(p)
        self._apply(p, force=force)
        self._record_outcome(p)

    def _check_account(self, p: _Pass) -> None:
        """Before any change: the keys the state tracks were made in the account rotator's
        credentials act in now. Pointed at another account (eim.endpoint, eim.region or the
        credentials changed), the user's keys would look gone and a pass would make the user
        and a key there and publish it over the working one. Recorded at the first change."""
        account = self._iam.account()
        problem = self._account_problem(p.state, account)
        if problem is not None:
            raise errors.ConfigError(f"target {p.spec.name}: eim", problem)
        if account is not None:
            p.state = p.state.replace(account=account)

    def _account_problem(self, state: model.TargetState, account: str | None) -> str | None:
        recorded = state.account
        if account is None or recorded is None or account == recorded or _movable(state):
            return None
        keys = _tracked_keys_text(state)
        return (
            f"its keys ({keys}) were made in IAM account {recorded}, and rotator's EIM "
            f"credentials now act in account {account} at {self._iam.endpoint}: nothing "
            f"was changed there. Put eim.endpoint, eim.region and eim.credentials_file "
            f"back; to move the target to account {account} for good, retire its keys in "
            f"{recorded} by hand, then remove its state from Vault (`kv metadata delete`; "
            f"a `kv delete` is refused) to start over"
        )

    @contextlib.contextmanager
    def _leased(self, spec: TargetSpec, wait: float) -> Iterator[_Lease]:
        assert self._lock is not None
        lock = self._lock
        deadline = self._clock.now() + timedelta(seconds=wait)
        while (grant := lock.acquire(spec.name, self._holder, self._lock_ttl)) is None:
            if self._clock.now() >= deadline:
                raise LockHeld(lock.holder(spec.name) or "another replica")
            if self._clock.wait(min(0.5, self._lock_ttl / 10)):
                raise Stopped
        lease = _Lease(spec.name, self._lock_ttl)
        lease.resumed = grant is model.Grant.RESUMED
        assert self._renewer is not None
        self._renewer.add(lease)
        try:
            yield lease
        finally:
            self._renewer.drop(lease)
            try:
                lock.release(spec.name, self._holder)
            except errors.RotatorError as exc:  # it expires by itself within lock_ttl
                log.warning("lock_not_released", target=spec.name, error=str(exc))

    # --- identity ------------------------------------------------------------------------

    def _identity_due(self, p: _Pass, *, force: bool) -> bool:
        """At start (first pass of this engine), on a config change, every
        ``identity_check_interval``, and when asked (`rotator rotate`)."""
        desired = p.spec.desired
        if desired is None:
            return False
        checked = self._identity_checked.get(p.spec.name)
        return (
            force
            or checked is None
            or p.state.identity_digest != desired.digest()
            or self._clock.now() - checked >= p.spec.identity_check_interval
        )

    def _observe_identity(
        self, p: _Pass, *, fresh: bool
    ) -> tuple[tuple[identity.Change, ...], model.Policy | None]:
        """The changes the identity needs, and the policy as observed.

        The group and the policy are usually shared by many targets: their reads are shared
        too (``SHARED_READS_MAX_AGE``) unless ``fresh``; the user is read for each target."""
        desired = p.spec.desired
        assert desired is not None
        age = min(SHARED_READS_MAX_AGE, p.spec.identity_check_interval)
        group_name, wanted = desired.group, desired.policy
        group = (
            self._shared.get(
                ("group", group_name), lambda: self._iam.get_group(group_name), age, fresh=fresh
            )
            if group_name
            else None
        )
        policy = (
            self._shared.get(
                ("policy", wanted.name), lambda: self._iam.get_policy(wanted.name), age, fresh=fresh
            )
            if wanted
            else None
        )
        user = self._iam.get_user(desired.user)
        return identity.plan(desired, group, policy, user), policy

    def _identity_checked_now(self, p: _Pass) -> None:
        """Note a check that found nothing (left) to change. The state records it when the
        digest changed and otherwise at most once per interval, so a check costs no write."""
        desired = p.spec.desired
        assert desired is not None
        now = self._clock.now()
        self._identity_checked[p.spec.name] = now
        digest, checked = desired.digest(), p.state.identity_checked_at
        if (
            p.state.identity_digest != digest
            or checked is None
            or now - checked >= p.spec.identity_check_interval
        ):
            p.state = p.state.replace(identity_digest=digest, identity_checked_at=now)

    def _ensure_identity(self, p: _Pass) -> None:
        """Under the lease: observe the identity and make the changes it needs. The user is
        read again; the shared group and policy reads too when the group or policy needs a
        change (another target may have made it meanwhile), not for a new user or membership."""
        desired = p.spec.desired
        if desired is None:
            return
        changes, policy = self._observe_identity(p, fresh=False)
        if not any(_shared_keys(change) for change in changes):
            self._make_identity_changes(p, changes, policy)
            return
        # The group or policy needs a change: read them again, fresh, while holding them, so
        # that the other targets sharing them do not make the same change again (a policy
        # version twice, a false policy_contested, both deleting one old version).
        subjects = [("group", desired.group or "")]
        if desired.policy is not None:
            subjects.append(("policy", desired.policy.name))
        with contextlib.ExitStack() as held:
            for subject in sorted(s for s in subjects if s[1]):
                with self._scan_lock:
                    lock = self._shared_changing.setdefault(subject, threading.Lock())
                held.enter_context(lock)
            changes, policy = self._observe_identity(p, fresh=True)
            self._make_identity_changes(p, changes, policy)

    def _make_identity_changes(
        self, p: _Pass, changes: tuple[identity.Change, ...], policy: model.Policy | None
    ) -> None:
        for change in changes:
            p.actions.append(change.describe())
            if self._dry_run:
                continue
            self._check_stop(p)
            wanted = _canonical(change.document)
            if (
                change.kind is identity.ChangeKind.CREATE_POLICY_VERSION
                and self._policies_set.get(change.subject) == wanted
            ):
                # this engine set exactly this document, and the default changed again since
                log.warning(
                    "policy_contested",
                    target=p.spec.name,
                    policy=change.subject,
                    note="its default version was changed since rotator set it, by a person or "
                    "another rotator whose config has another document for it: rotator sets it "
                    "back, and two configs that disagree undo each other at every identity "
                    "check. Give every config the same document (or fix it by hand no more)",
                )
            policy = self._apply_identity_change(change, policy)
            if change.kind in (
                identity.ChangeKind.CREATE_POLICY,
                identity.ChangeKind.CREATE_POLICY_VERSION,
            ):
                self._policies_set[change.subject] = wanted
            self._shared.forget(*_shared_keys(change))
            log.info(
                "identity_changed",
                target=p.spec.name,
                change=change.kind.value,
                subject=change.subject,
                reason=change.reason,
            )
        if self._dry_run:
            return
        self._identity_checked_now(p)

    def _apply_identity_change(
        self, change: identity.Change, policy: model.Policy | None
    ) -> model.Policy | None:
        kind = identity.ChangeKind
        try:
            if change.kind is kind.CREATE_GROUP:
                self._iam.create_group(change.subject)
            elif change.kind is kind.CREATE_POLICY:
                self._iam.create_policy(
                    change.subject, change.description, change.document, change.path
                )
                policy = self._iam.get_policy(change.subject)
            elif change.kind is kind.DELETE_POLICY_VERSION:
                assert policy is not None
                assert change.version_id is not None
                with contextlib.suppress(errors.EimNoSuchEntity):  # another replica did it
                    self._iam.delete_policy_version(policy.arn, change.version_id)
            elif change.kind is kind.CREATE_POLICY_VERSION:
                assert policy is not None
                self._iam.create_policy_version(policy.arn, change.document)
            elif change.kind is kind.ATTACH_POLICY:
                if policy is None:
                    policy = self._iam.get_policy(change.subject)
                if policy is None:
                    raise errors.EimNoSuchEntity(
                        f"policy {change.subject} vanished while being attached",
                        code="NoSuchEntity",
                    )
                assert change.group is not None
                self._iam.attach_group_policy(change.group, policy.arn)
            elif change.kind is kind.CREATE_USER:
                self._iam.create_user(change.subject)
            elif change.kind is kind.ADD_USER_TO_GROUP:
                assert change.group is not None
                self._iam.add_user_to_group(change.subject, change.group)
        except errors.EimAlreadyExists:
            # another target sharing the group or policy created it first
            if change.kind is kind.CREATE_POLICY:
                policy = self._iam.get_policy(change.subject)
        return policy

    # --- keys ----------------------------------------------------------------------------

    def _decide(self, p: _Pass, *, force: bool) -> rotation.Decision:
        return rotation.decide(
            list(p.keys.values()),
            p.state,
            p.published,
            p.spec.policy,
            self._clock.now(),
            force=force,
            window_open=p.spec.window_open,
        )

    def _apply(self, p: _Pass, *, force: bool) -> None:
        moved_from = _moved_from(p)
        if moved_from is not None:
            self._move_published(p, moved_from)
        stale = rotation.stale_pending(list(p.keys.values()), p.state, p.published.access_key_id)
        if stale is not None:
            raise errors.StateStale(f"target {p.spec.name}: {stale}")
        decision = self._decide(p, force=force)
        if decision.blocked and not self._dry_run and self._restore_published(p):
            decision = self._decide(p, force=force)
        p.decision = decision
        broken = rotation.published_secret_problem(p.state, p.published)
        if broken is not None:
            log.warning(
                "published_secret_broken",
                target=p.spec.name,
                key_id=p.published.access_key_id,
                secret_path=p.spec.secret_path,
                version=p.published.version,
                problem=broken,
                note="rotator publishes a fresh verified key (or, with no free slot, writes back "
                "the last version holding the current key's secret); to keep a secret of your "
                "own, publish a key id and secret that belong together",
            )
        untracked = _untracked_published(p.state, p.published, p.keys)
        if untracked is not None and any(
            a.kind in (rotation.ActionKind.CREATE_KEY, rotation.ActionKind.BLOCKED)
            for a in decision.actions
        ):
            log.warning(
                "published_key_untracked",
                target=p.spec.name,
                key_id=untracked,
                secret_path=p.spec.secret_path,
                note=_untracked_note(p.spec, untracked),
            )
        if self._dry_run:
            p.actions.extend(a.describe() for a in decision.actions)
            if decision.blocked:
                p.blocked = decision.blocked
            return
        for action in decision.actions:
            self._apply_action(p, action)

    def _apply_action(self, p: _Pass, action: rotation.Action) -> None:
        kind = rotation.ActionKind
        now = self._clock.now()
        spec = p.spec
        if action.kind in rotation.MUTATING:
            self._check_stop(p)
        if action.kind is not kind.BLOCKED:
            p.actions.append(action.describe())
        key_id = action.key_id
        if action.kind is kind.DROP_PENDING:
            p.state = p.state.replace(pending=None)
        elif action.kind is kind.PROMOTE_PENDING:
            pending = p.state.pending
            assert pending is not None
            # published before a crash: the key it replaced is the one noted at its creation
            p.state = rotation.promote(
                p.state, pending, spec.policy, now, replaced=pending.replaces
            )
            self._flush(p)
            p.rotated = True
        elif action.kind is kind.RESOLVE_PENDING:
            self._resolve_pending(p)
        elif action.kind in rotation.DELETING:
            assert key_id is not None
            self._delete_key(p, key_id, action.reason)
            if action.kind is kind.DELETE_RETIRED:
                p.state = rotation.forget_retiring(p.state, key_id)
        elif action.kind is kind.QUARANTINE_ORPHAN:
            assert key_id is not None
            self._guard(p, key_id)
            if p.keys[key_id].status is model.KeyStatus.ACTIVE:
                self._iam.set_key_status(spec.user, key_id, model.KeyStatus.INACTIVE)
                p.keys[key_id] = model.AccessKey(
                    key_id, model.KeyStatus.INACTIVE, p.keys[key_id].created
                )
            p.state = rotation.quarantined(p.state, key_id, spec.policy, now)
            held = p.state.retiring[-1]
            assert held.delete_at is not None
            log.warning(
                "key_quarantined",
                target=spec.name,
                key_id=key_id,
                reason=action.reason,
                delete_at=model.format_time(held.delete_at),
                note=f"if {key_id} is yours (made by hand while rotator was interrupted), make "
                f"it Active again before then: rotator then leaves it alone",
            )
        elif action.kind is kind.RELEASE_ORPHAN:
            assert key_id is not None
            p.state = rotation.forget_gone(p.state, key_id)
            log.warning("key_released", target=spec.name, key_id=key_id, reason=action.reason)
        elif action.kind is kind.CLEAR_INTENT:
            p.state = p.state.replace(intent=None)
        elif action.kind is kind.REINSTATE:
            assert key_id is not None
            p.state = rotation.reinstate(p.state, p.keys[key_id], spec.policy, now)
            log.info("key_reinstated", target=spec.name, key_id=key_id, reason=action.reason)
        elif action.kind is kind.FORGET_RETIRED:
            assert key_id is not None
            p.state = rotation.forget_gone(p.state, key_id)
        elif action.kind is kind.DEACTIVATE:
            assert key_id is not None
            self._guard(p, key_id)
            self._iam.set_key_status(spec.user, key_id, model.KeyStatus.INACTIVE)
            p.keys[key_id] = model.AccessKey(
                key_id, model.KeyStatus.INACTIVE, p.keys[key_id].created
            )
            p.state = rotation.deactivated(p.state, key_id, spec.policy, now)
            log.info("key_deactivated", target=spec.name, key_id=key_id, reason=action.reason)
        elif action.kind is kind.REGRACE:
            assert key_id is not None
            p.state = rotation.regraced(p.state, key_id, spec.policy, now)
            log.warning(
                "key_reactivated",
                target=spec.name,
                key_id=key_id,
                reason=action.reason,
                retire_at=model.format_time(now + spec.policy.grace),
            )
        elif action.kind is kind.SCHEDULE_DELETE:
            assert key_id is not None
            p.state = rotation.deactivated(p.state, key_id, spec.policy, now)
        elif action.kind is kind.BLOCKED:
            p.blocked = action.reason
            log.warning("rotation_blocked", target=spec.name, reason=action.reason)
        elif action.kind is kind.CREATE_KEY:
            self._create_key(p, action.reason)

    def _guard(self, p: _Pass, key_id: str) -> None:
        """Last line of defence: the published key is never deactivated or deleted."""
        if key_id == p.published.access_key_id:
            raise errors.RotatorError(
                f"refusing to deactivate or delete {key_id}: it is the published key"
            )

    def _delete_key(self, p: _Pass, key_id: str, reason: str) -> None:
        # a lease lost during the call before (a verification) may mean another replica has
        # published this very key since: stop before deleting anything
        self._check_stop(p)
        self._guard(p, key_id)
        with contextlib.suppress(errors.EimNoSuchEntity):  # already gone: the goal is reached
            self._iam.delete_key(p.spec.user, key_id)
        p.keys.pop(key_id, None)
        log.info("key_deleted", target=p.spec.name, key_id=key_id, reason=reason)

    def _create_key(self, p: _Pass, reason: str) -> None:
        spec = p.spec
        # The marker names the keys that exist before it, so that none of them can pass for its
        # orphan: a listing seconds old (a lease waited for, a slow Vault) is taken again.
        listed_at = p.keys_listed_at
        if listed_at is None or self._clock.now() - listed_at > KEYS_FRESH_FOR:
            before = set(p.keys)
            self._observe_keys(p)
            if len(p.keys) >= spec.policy.max_keys:  # a key made meanwhile took the free slot
                appeared = ", ".join(sorted(set(p.keys) - before)) or "none"
                p.blocked = (
                    f"no free key slot: {len(p.keys)} keys of max_keys {spec.policy.max_keys} "
                    f"when the key was about to be made (appeared since the pass began: "
                    f"{appeared}); the next pass looks again"
                )
                log.warning("rotation_blocked", target=spec.name, reason=p.blocked)
                return
        now = self._clock.now()
        # The intent must be durable before the key exists, or a crash would leak the key.
        p.state = p.state.replace(intent=model.Intent(now, tuple(p.keys)))
        self._flush(p)
        self._check_stop(p)
        try:
            new = self._iam.create_key(spec.user)
        except errors.EimQuotaExceeded as exc:
            p.state = p.state.replace(intent=None)  # nothing was created
            p.blocked = f"IAM refused a new key for {spec.user} (quota reached): {exc}"
            log.warning("rotation_blocked", target=spec.name, reason=p.blocked)
            return
        except errors.EimError as exc:
            # The marker is settled now if it can be: left behind, it would make a key someone
            # creates by hand in the next minutes look like this rotation's orphan.
            with contextlib.suppress(errors.RotatorError):
                self._settle_intent(p, refused=_refused(exc))
            raise
        log.info("key_created", target=spec.name, key_id=new.key_id, reason=reason)
        self._attempts_made[spec.name] = (new.key_id, 0)
        p.keys[new.key_id] = model.AccessKey(new.key_id, model.KeyStatus.ACTIVE, new.created)
        p.state = p.state.replace(
            intent=None,
            pending=model.PendingKey(
                key_id=new.key_id,
                secret=new.secret,
                created=new.created,
                replaces=p.published.access_key_id,
                made_at=self._clock.now(),
            ),
        ).remember_created(new.key_id)
        try:
            self._flush(p)
        except errors.RotatorError:
            # The secret exists only in memory: a key nobody can ever use. Remove it now; if
            # that fails too, the intent still in Vault makes the next pass remove it.
            try:
                self._iam.delete_key(spec.user, new.key_id)
                log.warning(
                    "key_deleted",
                    target=spec.name,
                    key_id=new.key_id,
                    reason="its secret could not be stored in Vault",
                )
            except errors.RotatorError:
                log.warning(
                    "key_orphaned",
                    target=spec.name,
                    key_id=new.key_id,
                    reason="the next pass makes it Inactive, then deletes it after a hold",
                )
            raise
        self._resolve_pending(p)

    def _settle_intent(self, p: _Pass, *, refused: bool) -> None:
        """After a failed CreateAccessKey: clear the marker once it is known what the call made.

        ``refused``: IAM answered that it made nothing. Otherwise the answer may be lost: the
        keys are listed again at once; one key the marker did not know of is the call's, its
        secret lost, and is deleted; with none the call made nothing. Two new keys cannot be
        told apart: the marker stays for the next pass, which leaves both alone. A failure here
        (IAM still away) leaves the marker too, for the next pass.
        """
        intent = p.state.intent
        assert intent is not None
        if not refused:
            self._observe_keys(p)
            made = [k for k in p.keys if k not in intent.existing_ids]
            if len(made) > 1:
                return
            for key_id in made:
                self._delete_key(p, key_id, "made by a CreateAccessKey whose answer was lost")
        p.state = p.state.replace(intent=None)
        self._flush(p)

    def _resolve_pending(self, p: _Pass) -> None:
        """Verify the pending key until it authenticates, or give it up; publish when it does."""
        spec = p.spec
        while True:
            pending = p.state.pending
            assert pending is not None
            if pending.verified_at is not None:
                # it authenticated in an earlier pass whose publish failed (Vault went away)
                self._publish(p, pending)
                return
            now = self._clock.now()
            at = rotation.next_verify_at(pending)
            if self._attempts_made.get(spec.name) != (pending.key_id, pending.attempts):
                # counted by another process (a crash, a restart, a replica): one more attempt
                # may have been made after the count was written, maybe just now; OUTSCALE's
                # lock-out counts it, so the waits allow for it from here on
                at = max(at, now + rotation.verify_delay(pending.attempts + 1))
                pending = dataclasses.replace(pending, uncounted=True)
                p.state = p.state.replace(pending=pending)
            wait = (at - now).total_seconds()
            if wait > 0 and self._clock.wait(wait):
                raise Stopped
            self._check_stop(p)
            result = self._iam.verify_key(pending.key_id, pending.secret)
            now = self._clock.now()
            pending = dataclasses.replace(
                pending, attempts=pending.attempts + 1, last_attempt_at=now, verified_at=None
            )
            self._attempts_made[spec.name] = (pending.key_id, pending.attempts)
            judgement = rotation.judge_verification(pending, result, spec.policy, now)
            log.info(
                "key_verification",
                target=spec.name,
                key_id=pending.key_id,
                attempt=pending.attempts,
                outcome=result.outcome.value,
                detail=result.detail,
                verdict=judgement.verdict.value,
            )
            if judgement.verdict is rotation.Verdict.PUBLISH:
                # kept in memory only: written if the publish fails, so the next pass need not
                # verify again (no extra Vault write on the common path)
                pending = dataclasses.replace(pending, verified_at=now)
                p.state = p.state.replace(pending=pending)
                self._publish(p, pending)
                return
            if judgement.verdict is rotation.Verdict.GIVE_UP:
                p.components.append("verify")
                p.rotation_failed = True
                self._delete_key(p, pending.key_id, judgement.reason)
                failures = p.state.failures + 1
                p.state = p.state.replace(
                    pending=None,
                    failures=failures,
                    retry_after=now + rotation.failure_backoff(failures, spec.policy),
                    last_error=judgement.reason,
                    last_error_at=now,
                )
                self._flush(p)
                return
            p.state = p.state.replace(pending=pending)
            self._flush(p)

    def _publish(self, p: _Pass, pending: model.PendingKey) -> None:
        spec = p.spec
        key = model.NewKey(pending.key_id, pending.secret, pending.created)
        self._check_stop(p)
        base = p.published
        try:
            p.published = self._store.write_published(spec.secret_path, key, base)
        except errors.VaultConflict:
            # someone edited the secret since we read it: keep their fields, write again once
            # (unless the lease was lost meanwhile: then it may be another replica's publish)
            base = self._store.read_published(spec.secret_path)
            self._check_stop(p)
            p.published = self._store.write_published(spec.secret_path, key, base)
        now = self._clock.now()
        old = p.state.current
        p.state = rotation.promote(p.state, pending, spec.policy, now, replaced=base.access_key_id)
        p.published_new = True
        p.state = self._outcome(p)  # one state write for the promotion and the pass's outcome
        log.info(
            "key_published",
            target=spec.name,
            key_id=pending.key_id,
            secret_path=spec.secret_path,
            previous_key_id=old.key_id if old else None,
        )
        self._flush(p)
        # counted once the state says so: a promotion whose write is lost (check-and-set) is
        # finished, and counted, by the next pass (PROMOTE_PENDING)
        p.rotated = True

    def _move_published(self, p: _Pass, old_path: str) -> None:
        """The config names another ``secret_path`` than the one the current key was published
        at: the published secret follows it. The current key (still Active, verified again with
        the secret the old path holds) is written at the new path, so consumers of either path
        have a working key; the old path is no longer written, and its key stops working when
        it retires after the next rotation. When the old path does not hold the current key the
        decision publishes a fresh one instead. Nothing is ever deleted from either path."""
        spec, current = p.spec, p.state.current
        new_path = spec.secret_path
        if p.state.pending is not None or current is None:
            return  # a rotation in flight publishes at the new path; nothing published yet
        if p.published.access_key_id == current.key_id:
            return  # already there (a crash after the copy, or a path moved back)
        key = p.keys.get(current.key_id)
        found = self._store.read_published_secret(old_path)
        copied = False
        if key is not None and key.status is model.KeyStatus.ACTIVE and found is not None:
            key_id, secret = found
            if key_id == current.key_id:
                action = (
                    f"move_secret {key_id}: secret_path changed from {old_path}: the current "
                    f"key is published at {new_path} too"
                )
                if self._dry_run:  # plan the rest as if it had been copied
                    p.actions.append(action)
                    p.published = dataclasses.replace(
                        p.published, access_key_id=key_id, created_at=current.created
                    )
                    return
                self._check_stop(p)
                result = self._iam.verify_key(key_id, secret)
                if result.outcome is model.VerifyOutcome.VALID:
                    self._check_stop(p)
                    p.published = self._store.write_published(
                        new_path, model.NewKey(key_id, secret, current.created), p.published
                    )
                    p.actions.append(action)
                    copied = True
        log.warning(
            "secret_path_changed",
            target=spec.name,
            old_path=old_path,
            new_path=new_path,
            key_id=current.key_id,
            copied=copied,
            note=(
                f"{old_path} is no longer written: it keeps key {current.key_id} until that key "
                "retires after the next rotation (then grace); point consumers at the new path"
                if copied
                else f"{old_path} does not hold the current key {current.key_id} (or it no "
                f"longer works): a fresh verified key is published at {new_path}, and "
                f"{current.key_id} retires after grace"
            ),
        )

    def _restore_published(self, p: _Pass) -> bool:
        """Blocked while the published secret holds no key of the user (deleted, or overwritten
        with a wrong id): consumers fail until a slot frees. The current key still works and an
        earlier version of the secret holds it: that version is verified and written back
        (check-and-set), nothing deleted, the overwriting version kept in Vault's history.
        Tried once for each version of the secret, so a failed try costs no attempt a pass."""
        spec, current, published = p.spec, p.state.current, p.published
        if p.state.pending is not None or current is None or published.version < 2:
            return False
        key = p.keys.get(current.key_id)
        if key is None or key.status is not model.KeyStatus.ACTIVE:
            return False
        if (
            published.access_key_id is not None
            and published.access_key_id in p.keys
            and rotation.published_secret_problem(p.state, published) is None
        ):
            return False  # a key of the user: rolled back, or someone's choice; not undone
        tried = f"{spec.secret_path}@{published.version}"
        if p.state.restore_tried == tried:
            return False
        restored = self._restore_from_history(p)
        if not restored:  # a definite answer (an error is tried again), kept in the state: no
            # process verifies that version's secret again (OUTSCALE counts each failed try)
            p.state = p.state.replace(restore_tried=tried)
        return restored

    def _restore_from_history(self, p: _Pass) -> bool:
        spec, current, published = p.spec, p.state.current, p.published
        assert current is not None
        oldest = max(1, published.version - RESTORE_LOOKBACK)
        for version in range(published.version - 1, oldest - 1, -1):
            found = self._store.read_published_secret(spec.secret_path, version)
            if found is None or found[0] != current.key_id:
                continue
            digest = model.secret_digest(found[1].reveal())
            if digest == published.secret_digest:
                continue  # the broken secret itself, in an earlier version
            refused = None
            if current.secret_digest is not None and digest != current.secret_digest:
                # not the secret rotator verified: no signature is spent to learn it fails
                refused = "that version's secret is not the one rotator verified for this key"
            else:
                self._check_stop(p)
                result = self._iam.verify_key(current.key_id, found[1])
                if result.outcome is not model.VerifyOutcome.VALID:
                    refused = f"that version's secret did not authenticate ({result.detail})"
            if refused is not None:
                log.warning(
                    "published_not_restored",
                    target=spec.name,
                    key_id=current.key_id,
                    secret_path=spec.secret_path,
                    from_version=version,
                    reason=refused,
                )
                return False
            self._check_stop(p)
            p.published = self._store.write_published(
                spec.secret_path, model.NewKey(current.key_id, found[1], current.created), published
            )
            p.actions.append(
                f"restore_published {current.key_id}: version {published.version} of "
                f"{spec.secret_path} held {_held(published)}; version {version}, which holds the "
                f"current key, verified and written back as version {p.published.version}"
            )
            log.warning(
                "published_restored",
                target=spec.name,
                key_id=current.key_id,
                secret_path=spec.secret_path,
                replaced_version=published.version,
                replaced_key_id=published.access_key_id,
                from_version=version,
                version=p.published.version,
                note="the secret held no key of the user and no slot was free for a new one",
            )
            return True
        return False

    # --- state ---------------------------------------------------------------------------

    def _flush(self, p: _Pass) -> None:
        """Write the state if it changed (check-and-set on the version read)."""
        if self._dry_run or p.state == p.stored.state:
            return
        version = self._store.write_state(p.spec.name, p.state, p.stored.version)
        p.stored = model.StoredState(p.state, version)

    def _outcome(self, p: _Pass) -> model.TargetState:
        """The state with this pass's outcome recorded (what `status` reads)."""
        now = self._clock.now()
        state = p.state.replace(
            next_due_at=rotation.next_due(p.state, p.spec.policy),
            # a grace lengthened by a reload is written down: a later shorter one cannot cut it
            retiring=rotation.deadlines_in_force(p.state.retiring, p.spec.policy),
        )
        if state.last_error is not None and not p.rotation_failed and p.blocked is None:
            state = state.replace(last_error=None)
        if p.blocked is not None:
            state = _note_error(state, p.blocked, now)
        if state != p.stored.state or (
            state.last_success_at is None
            or now - state.last_success_at >= p.spec.identity_check_interval
        ):
            state = state.replace(last_success_at=now)
        return state

    def _record_outcome(self, p: _Pass) -> None:
        if self._dry_run:
            return
        p.state = self._outcome(p)
        self._flush(p)

    def _record_failure(self, p: _Pass | None, error: str) -> None:
        """Best effort: keep the error in state for `status`; Vault may be what failed."""
        if p is None or self._dry_run:
            return
        p.state = _note_error(p.state, error, self._clock.now())
        try:
            self._flush(p)
        except errors.RotatorError as exc:
            log.debug("state_not_written", target=p.spec.name, error=str(exc))

    def _check_stop(self, p: _Pass | None = None) -> None:
        """Called before every mutating step: stop requested, or the lease lost, ends the pass."""
        if self._clock.wait(0):
            raise Stopped
        if p is not None and p.lease is not None and (p.lease.lost.is_set() or p.lease.expired()):
            raise errors.LockError(
                f"lost the lock of target {p.spec.name} (Vault slow or unreachable? or the "
                "clocks of two replicas apart: see clock_skew in the log): stopping before the "
                "next change; the next pass continues"
            )

    def _report(
        self,
        spec: TargetSpec,
        p: _Pass | None,
        error: str | None,
        components: list[str],
        duration: float,
        skipped: str | None = None,
    ) -> model.PassReport:
        if skipped is not None:
            return model.PassReport(
                target=spec.name, ok=True, duration_seconds=duration, skipped=skipped
            )
        if p is None:
            return model.PassReport(
                target=spec.name,
                ok=False,
                duration_seconds=duration,
                error=error,
                error_components=tuple(components),
                dry_run=self._dry_run,
            )
        state = p.state
        current = state.current
        published_created = (
            current.created
            if current is not None and current.key_id == p.published.access_key_id
            else p.published.created_at
        )
        foreign = () if p.decision is None else p.decision.foreign
        blocked = p.blocked is not None
        return model.PassReport(
            target=spec.name,
            ok=error is None and not blocked and not p.rotation_failed,
            duration_seconds=duration,
            rotated=p.rotated,
            rotation_failed=p.rotation_failed,
            blocked=blocked,
            blocked_reason=p.blocked,
            published_key_id=p.published.access_key_id,
            key_created=published_created,
            last_rotation_at=state.last_rotation_at,
            next_due=rotation.next_due(state, spec.policy),
            due_by_age=rotation.due_by_age(state, spec.policy),
            keys_observed=p.keys_observed,
            keys_active=sum(k.status is model.KeyStatus.ACTIVE for k in p.keys.values()),
            keys_inactive=sum(k.status is model.KeyStatus.INACTIVE for k in p.keys.values()),
            foreign_keys=len([k for k in foreign if k in p.keys]),
            pending_key_id=state.pending.key_id if state.pending else None,
            error=error if error is not None else (state.last_error if p.rotation_failed else None),
            error_components=tuple(p.components + components),
            actions=tuple(p.actions),
            dry_run=self._dry_run,
        )

    # --- targets the config no longer names ----------------------------------------------

    def unconfigured(self) -> dict[str, model.StoredState]:
        """The states of targets the config does not name that still track keys: a target
        removed (its keys are no longer rotated nor retired) or renamed (its next pass carries
        the state over). A state some configured target now carries is not one of them.

        Vault is listed once (``<state_path>/targets/``). A token whose policy does not grant
        the list gets a warning once and an empty answer: passes go on, without this check."""
        with self._scan_lock:
            if self._unconfigured is None:
                try:
                    self._unconfigured = self._scan()
                except errors.VaultDenied as exc:
                    self._scan_denied = str(exc)
                    log.warning(
                        "unconfigured_check_failed",
                        error=str(exc),
                        note="targets removed or renamed in the config are not looked for",
                    )
                    self._unconfigured = {}
            return dict(self._unconfigured)

    def unconfigured_view(self, configured: Iterable[TargetSpec]) -> list[UnconfiguredView]:
        """unconfigured(), by target name, each with the configured target (of ``configured``)
        that has its user, if one has."""
        heirs = {spec.user: spec.name for spec in configured}  # as _check_owner compares
        return [
            UnconfiguredView(
                target=name,
                user=stored.state.user,
                current_key_id=stored.state.current.key_id if stored.state.current else None,
                retiring_key_ids=tuple(r.key_id for r in stored.state.retiring),
                pending_key_id=stored.state.pending.key_id if stored.state.pending else None,
                heir=heirs.get(stored.state.user or ""),
            )
            for name, stored in sorted(self.unconfigured().items())
        ]

    def unconfigured_count(self) -> int | None:
        """How many states unconfigured() holds, without listing Vault: None when the states
        have not been listed yet (or the listing failed)."""
        found = self._unconfigured
        return None if found is None else len(found)

    def _scan(self) -> dict[str, model.StoredState]:
        found: dict[str, model.StoredState] = {}
        listed = self._store.list_states()
        for name in listed:
            if name in self._configured:
                continue
            try:
                stored = self._store.read_state(name)
            except errors.StateSchemaError:
                continue  # not a state this rotator can read
            state = stored.state
            if state.renamed_to is not None and state.renamed_to in listed:
                continue  # renamed: the state that carries its keys on is the one to tell of
            if state.tracked_ids() or state.intent is not None:
                found[name] = stored
        return found

    def _state_of(self, spec: TargetSpec, *, write: bool = True) -> model.StoredState:
        """The target's stored state, carried over from its old name first when it has none
        (see _carry_over); ``write`` False (status) shows the carried state, writes nothing."""
        stored = self._store.read_state(spec.name)
        if stored.version == 0 or stored.state == model.TargetState():  # none, or deleted
            stored = self._carry_over(spec, stored, write=write and not self._dry_run)
            if stored.version == 0 and self._scan_denied is not None:
                self._warn_unlisted(spec)
        elif self._unconfigured:
            self._forget_carried(spec)
        return stored

    def _forget_carried(self, spec: TargetSpec) -> None:
        """A state listed as unconfigured that another process has since carried on to this
        target (`rotator adopt` or `rotate` right after a rename) is not unconfigured now."""
        with self._scan_lock:
            same_user = [
                name
                for name, old in (self._unconfigured or {}).items()
                if old.state.user == spec.user
            ]
        for name in same_user:
            if self._store.read_state(name).state.renamed_to is not None:
                with self._scan_lock:
                    if self._unconfigured is not None:
                        self._unconfigured.pop(name, None)

    def _warn_unlisted(self, spec: TargetSpec) -> None:
        with self._scan_lock:
            if spec.name in self._unlisted_warned:
                return
            self._unlisted_warned.add(spec.name)
        log.warning(
            "unconfigured_check_failed",
            target=spec.name,
            error=self._scan_denied,
            note=f"target {spec.name} has no state and rotator may not list the states: if it "
            "was renamed, its old state is not carried on and its keys count as foreign; "
            "grant the list (deploy/policies/rotator.hcl)",
        )

    def _carry_over(
        self, spec: TargetSpec, stored: model.StoredState, *, write: bool
    ) -> model.StoredState:
        """A target without a state whose user's keys the state of an unconfigured target
        tracks: the same target under a new name. The old state is marked first
        (``renamed_to``, all else kept: a rotator still running the old name stops there, and a
        crash here is finished by the next pass), then written under the new name. A marked
        state is never taken back (a stale replica would): rotator never deletes a state."""
        mine = [
            (name, old)
            for name, old in self.unconfigured().items()
            if old.state.user is not None
            # the user exactly as _check_owner compares it, or the carried state is refused
            # after its old one was marked (IAM may or may not fold case: never guessed)
            and old.state.user == spec.user
            and old.state.renamed_to in (None, spec.name)  # marked: a crash after the mark
        ]
        if not mine:
            return stored
        if len(mine) > 1:
            names = ", ".join(name for name, _ in mine)
            raise errors.ConfigError(
                f"target {spec.name}",
                f"the keys of user {spec.user} are tracked by the states of targets {names}, "
                "none of them in the config: name the target as one of them (it carries that "
                "state on), or put them back until their keys are retired",
            )
        name, _ = mine[0]
        old = self._store.read_state(name)  # fresh: its version fences the marking
        if not write:
            return model.StoredState(old.state.replace(renamed_to=None), stored.version, name)
        if old.state.renamed_to != spec.name:
            self._store.write_state(name, old.state.replace(renamed_to=spec.name), old.version)
        carried = old.state.replace(renamed_to=None)
        version = self._store.write_state(spec.name, carried, stored.version)
        with self._scan_lock:
            if self._unconfigured is not None:
                self._unconfigured.pop(name, None)
        log.warning(
            "target_renamed",
            target=spec.name,
            old_target=name,
            user=spec.user,
            keys=sorted(carried.tracked_ids()),
            note=f"the state of {name} is carried on by {spec.name}; {name} is marked renamed",
        )
        return model.StoredState(carried, version, name)

    # --- operator commands ---------------------------------------------------------------

    def status(self, spec: TargetSpec) -> StatusView:
        """Observe a target without changing anything."""
        stored = self._state_of(spec, write=False)
        published = self._store.read_published(spec.secret_path)
        problem: str | None = None
        user = spec.user
        try:
            _check_owner(spec, stored.state)
        except errors.ConfigError as exc:
            problem = str(exc)
            user = stored.state.user or user  # the keys the state tracks, not the new user's
        try:
            if problem is None:
                problem = self._account_problem(stored.state, self._iam.account())
            keys = self._iam.list_keys(user)
        except errors.EimNoSuchEntity:
            keys = []  # with a managed identity the next pass creates the user
            if spec.desired is None:
                problem = _missing_user(spec)
        except errors.EimError as exc:  # what Vault holds is still worth showing
            return self._status_without_iam(spec, stored.state, published, str(exc))
        state = stored.state
        now = self._clock.now()
        decision = rotation.decide(
            keys, state, published, spec.policy, now, window_open=spec.window_open
        )
        by_id = {k.key_id: k for k in keys}
        untracked = _untracked_published(state, published, by_id)
        if problem is None and untracked is not None:
            problem = _untracked_note(spec, untracked)
        retiring: list[tuple[str, RetiringPhase, datetime | None]] = []
        for r in state.retiring:
            key = by_id.get(r.key_id)
            if key is None:
                retiring.append((r.key_id, RetiringPhase.GONE, None))
            elif key.status is model.KeyStatus.ACTIVE:
                retiring.append(
                    (r.key_id, RetiringPhase.GRACE, rotation.retire_deadline(r, spec.policy))
                )
            else:
                phase = RetiringPhase.HELD if r.orphan else RetiringPhase.INACTIVE
                retiring.append((r.key_id, phase, rotation.delete_deadline(r, spec.policy)))
        return _status_view(
            spec,
            state,
            published,
            next_due=decision.next_due,
            due_reason=decision.due_reason,
            retiring=tuple(retiring),
            foreign=decision.foreign,
            keys=tuple(keys),
            blocked=decision.blocked,
            last_error=problem or state.last_error,
        )

    def _status_without_iam(
        self,
        spec: TargetSpec,
        state: model.TargetState,
        published: model.Published,
        error: str,
    ) -> StatusView:
        """The status from Vault alone, IAM unreadable: the keys as the state records them."""
        return _status_view(
            spec,
            state,
            published,
            next_due=rotation.next_due(state, spec.policy),
            due_reason=None,
            retiring=tuple((r.key_id, RetiringPhase.UNKNOWN, None) for r in state.retiring),
            foreign=(),
            keys=(),
            blocked=None,
            last_error=f"IAM not read, keys as rotator's state records them: {error}",
        )

    def adopt(
        self,
        spec: TargetSpec,
        key_id: str,
        others: Iterable[TargetSpec] = (),
        *,
        lock_wait: float = 0.0,
    ) -> str:
        """Hand a foreign key to the rotator, which retires it like its own. Returns a summary.

        A key another target's state tracks (``others``: the configured targets; and the states
        of targets the config no longer names) is refused: it is not foreign, and that target
        may still publish it. Made under the target's lease (waiting up to ``lock_wait`` for a
        pass holding it), as a pass's changes are: a rotation in flight is not written over."""
        others = list(others)
        if self._lock is None or self._dry_run:
            return self._adopt_tries(spec, key_id, others)
        try:
            with self._leased(spec, lock_wait):
                return self._adopt_tries(spec, key_id, others)
        except LockHeld as held:
            raise errors.LockError(
                f"{key_id} was not adopted: target {spec.name} is being worked on by "
                f"{held.holder} (its lease was not free within {lock_wait:g}s): run `rotator "
                "adopt` again"
            ) from None

    def _adopt_tries(self, spec: TargetSpec, key_id: str, others: list[TargetSpec]) -> str:
        """A state written meanwhile (a process without the lease: an older rotator) is read
        again and the adoption made over it, a few times."""
        for _ in range(ADOPT_TRIES - 1):
            with contextlib.suppress(errors.VaultConflict):
                return self._adopt(spec, key_id, others)
        try:
            return self._adopt(spec, key_id, others)
        except errors.VaultConflict:
            raise errors.RotatorError(
                f"{key_id} was not adopted: the state of target {spec.name} changed under each "
                f"of {ADOPT_TRIES} tries (a pass in progress): run `rotator adopt` again"
            ) from None

    def _adopt(self, spec: TargetSpec, key_id: str, others: list[TargetSpec]) -> str:
        stored = self._state_of(spec)  # a renamed target's keys are its own, not foreign
        keys = {k.key_id: k for k in self._iam.list_keys(spec.user)}
        state = stored.state
        key = keys.get(key_id)
        if key is None:
            raise errors.EimNoSuchEntity(
                f"user {spec.user} has no access key {key_id}: see `rotator status` for its keys",
                code="NoSuchEntity",
            )
        held = next((r for r in state.retiring if r.key_id == key_id and r.orphan), None)
        if held is not None:  # a held orphan: retired like an adopted key from now
            state = rotation.forget_retiring(state, key_id)
        elif _tracked_in(state, key_id):
            return f"{key_id} is already managed by rotator for target {spec.name}"
        owner = self._tracked_elsewhere(spec, key_id, others)
        if owner is not None:
            raise errors.RotatorError(
                f"key {key_id} is tracked by the state of target {owner}, which may still "
                f"publish it: it is not foreign to rotator, and adopting it for {spec.name} "
                f"would retire it under {owner}'s consumers. Fix {owner} first (see `rotator "
                "status`); its next pass retires the key once it no longer needs it",
            )
        new_state = rotation.adopt(state, key, spec.policy, self._clock.now())
        if self._dry_run:
            return f"would adopt {key_id}: it would retire through grace, Inactive and deletion"
        self._store.write_state(spec.name, new_state, stored.version)
        log.info("key_adopted", target=spec.name, key_id=key_id)
        return f"{key_id} adopted: it retires through grace, Inactive and deletion"

    def _tracked_elsewhere(
        self, spec: TargetSpec, key_id: str, others: Iterable[TargetSpec]
    ) -> str | None:
        """The other target whose state tracks ``key_id``, if one does."""
        for name, state in self._states(others):
            if name != spec.name and _tracked_in(state, key_id):
                return name
        return None

    def tracked_by(self, specs: Iterable[TargetSpec]) -> dict[str, str]:
        """The target whose state tracks each key (its own or one it created), over the
        configured targets ``specs`` and the states the config no longer names. A key that
        one target counts as foreign may be another's (a name reused after a rename)."""
        owners: dict[str, str] = {}
        for name, state in self._states(specs):
            for key_id in _known_ids(state):
                owners.setdefault(key_id, name)
        return owners

    def _states(self, specs: Iterable[TargetSpec]) -> Iterator[tuple[str, model.TargetState]]:
        for spec in specs:
            yield spec.name, self._store.read_state(spec.name).state
        for name, old in self.unconfigured().items():
            yield name, old.state


def _untracked_published(
    state: model.TargetState, published: model.Published, keys: Mapping[str, model.AccessKey]
) -> str | None:
    """The key the published secret holds when the target has no current key and its state
    does not track that key, though IAM lists it for the user: a first run over a secret
    written by hand, or a state rotator no longer finds (vault.mount or vault.state_path
    changed, the state deleted)."""
    key_id = published.access_key_id
    if state.current is not None or key_id is None or key_id not in keys:
        return None
    return None if _tracked_in(state, key_id) else key_id


def _untracked_note(spec: TargetSpec, key_id: str) -> str:
    return (
        f"the secret at {spec.secret_path} holds {key_id}, a live key of user {spec.user} that "
        f"the state of {spec.name} does not track: a key published by hand, or a state rotator "
        "no longer finds (vault.mount or vault.state_path changed, or the state deleted). "
        f"rotator leaves {key_id} Active, as foreign, and publishes a key of its own over it "
        "once a key slot is free. A setting changed by mistake: put it back (docs/runbook.md, "
        f"RotatorForeignKeys); a key published by hand: `rotator adopt {spec.name} {key_id}` "
        "retires it once consumers have the new key"
    )


def _status_view(
    spec: TargetSpec,
    state: model.TargetState,
    published: model.Published,
    *,
    next_due: datetime | None,
    due_reason: str | None,
    retiring: tuple[tuple[str, RetiringPhase, datetime | None], ...],
    foreign: tuple[str, ...],
    keys: tuple[model.AccessKey, ...],
    blocked: str | None,
    last_error: str | None,
) -> StatusView:
    """A status row: what the config and Vault say, with what IAM was seen to say."""
    return StatusView(
        target=spec.name,
        user=spec.user,
        secret_path=spec.secret_path,
        published_key_id=published.access_key_id,
        current_key_id=state.current.key_id if state.current else None,
        current_created=state.current.created if state.current else None,
        next_due=next_due,
        due_reason=due_reason,
        pending_key_id=state.pending.key_id if state.pending else None,
        retiring=retiring,
        foreign=foreign,
        keys=keys,
        blocked=blocked,
        last_error=last_error,
        last_rotation_at=state.last_rotation_at,
        failures=state.failures,
    )


def _known_ids(state: model.TargetState) -> frozenset[str]:
    """The keys a state gives a role (current, pending, retiring) or remembers creating."""
    return state.tracked_ids() | frozenset(state.created_ids)


def _tracked_in(state: model.TargetState, key_id: str) -> bool:
    return key_id in _known_ids(state)


def _shared_keys(change: identity.Change) -> tuple[tuple[str, str], ...]:
    """The shared reads a change makes stale."""
    kind = identity.ChangeKind
    if change.kind in (kind.CREATE_GROUP, kind.ATTACH_POLICY):
        return (("group", change.group or change.subject),)
    if change.kind in (kind.CREATE_POLICY, kind.CREATE_POLICY_VERSION, kind.DELETE_POLICY_VERSION):
        return (("policy", change.subject),)
    return ()


def _owned(spec: TargetSpec, stored: model.StoredState) -> model.TargetState:
    """The stored state, checked to be the target's user's and marked as such (a state written
    before users were recorded gets it at its next write)."""
    _check_owner(spec, stored.state)
    return stored.state.replace(user=spec.user, secret_path=spec.secret_path)


def _canonical(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def _held(published: model.Published) -> str:
    """What a published secret holds, for a message."""
    if published.access_key_id is None:
        return "no key (deleted)"
    return f"{published.access_key_id}, not a key of the user"


def _moved_from(p: _Pass) -> str | None:
    """The path the current key was published at, when the config now names another one."""
    recorded = p.stored.state.secret_path
    if recorded is None or recorded.strip("/") == p.spec.secret_path.strip("/"):
        return None
    return recorded


def _movable(state: model.TargetState) -> bool:
    """No user recorded yet, or nothing of its user's tracked: the state may take another."""
    return state.user is None or (not state.tracked_ids() and state.intent is None)


def _check_owner(spec: TargetSpec, state: model.TargetState) -> None:
    """The keys a state tracks belong to the user it was written for: a target whose user was
    changed in the config would otherwise lose track of the old user's keys (still valid).
    A state marked renamed is carried on by another target: this config is out of date."""
    if state.renamed_to is not None:
        raise errors.ConfigError(
            f"target {spec.name}",
            f"its state and keys are carried on by target {state.renamed_to} since a config "
            f"renamed it; this config still names {spec.name}: use the config that names "
            f"{state.renamed_to}. To rename it back, delete this marked state first (`bao kv "
            f"metadata delete` on it): the next pass of {spec.name} then carries "
            f"{state.renamed_to}'s state back",
        )
    if state.user == spec.user or _movable(state):
        return
    keys = _tracked_keys_text(state)
    raise errors.ConfigError(
        f"target {spec.name}: user",
        f"the target's keys ({keys}) belong to user {state.user}, the config now "
        f"says {spec.user}; rotator does not move a target between users: put user: "
        f"{state.user} back, or delete those keys of {state.user} by hand and then remove "
        f"the target's state from Vault (`kv metadata delete`; a `kv delete` is refused) "
        f"to start over with {spec.user}",
    )


def _tracked_keys_text(state: model.TargetState) -> str:
    """The keys a state tracks, for an error saying why it cannot be moved."""
    return ", ".join(sorted(state.tracked_ids())) or "a key an interrupted rotation made"


def _refused(exc: errors.EimError) -> bool:
    """An answer from IAM that proves the call changed nothing (denied, invalid, no such
    user...), as opposed to a lost answer, a 5xx or throttling, after which it may have."""
    return type(exc) is not errors.EimError and not exc.transient


def _missing_user(spec: TargetSpec) -> str:
    """The problem of a target whose user is managed elsewhere and does not exist."""
    return (
        f"user {spec.user} does not exist: create it, or give target {spec.name} "
        "a group so rotator manages the user"
    )


def _note_error(state: model.TargetState, error: str, now: datetime) -> model.TargetState:
    """Record a problem; the same problem again changes nothing (no Vault write every pass)."""
    if state.last_error == error:
        return state
    return state.replace(last_error=error, last_error_at=now)
