"""In-memory fakes of the ports, with an explicit clock, that check the protocol's invariants.

The fakes raise :class:`InvariantBroken` (a BaseException, so the engine's broad catch cannot
swallow it) the moment the rotator does something that could lock an operator out: deactivating
or deleting the published key, touching a foreign key, creating a key beyond ``max_keys``, or
publishing a key that does not authenticate. :class:`Crash` simulates a kill -9 in mid-call.
"""

from __future__ import annotations

import itertools
import secrets as pysecrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rotator import errors, model

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class InvariantBroken(BaseException):
    """The rotator did something the protocol forbids."""


class Crash(BaseException):
    """The process died here (kill -9): nothing after this runs."""


class FakeClock:
    def __init__(self, start: datetime = T0) -> None:
        self.t = start
        self.stop_requested = False

    def now(self) -> datetime:
        return self.t

    def wait(self, seconds: float) -> bool:
        if self.stop_requested:
            return True
        self.t += timedelta(seconds=seconds)
        return False

    def advance(self, **kw: float) -> None:
        self.t += timedelta(**kw)


@dataclass
class FakeKey:
    key_id: str
    secret: str
    status: model.KeyStatus
    created: datetime
    foreign: bool = False
    broken: bool = False  # never authenticates
    ready_at: datetime | None = None  # authenticates from then on (propagation)


@dataclass
class CrashPlan:
    """Crash on the n-th mutating call (0-based), before or after applying it."""

    at: int | None = None
    after_apply: bool = False
    calls: int = 0

    def tick(self) -> bool | None:
        """None: go on; False: crash before applying; True: apply, then crash."""
        n = self.calls
        self.calls += 1
        if self.at is not None and n == self.at:
            self.at = None
            return self.after_apply
        return None


class FakeIAM:
    _ids = itertools.count(1)
    endpoint = "http://iam.fake"

    def __init__(self, clock: FakeClock, *, max_keys: int = 2, quota: int = 2) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self.quota = quota
        self.users: dict[str, list[FakeKey]] = {}
        self.account_id: str | None = "123456789012"
        self.account_calls = 0
        self.groups: dict[str, set[str]] = {}
        self.group_policies: dict[str, set[str]] = {}
        self.policies: dict[str, list[tuple[str, Mapping[str, Any], datetime]]] = {}
        self.default_version: dict[str, str] = {}
        self.policy_paths: dict[str, str] = {}
        self.propagation = timedelta(0)
        self.break_next_keys = 0
        self.crash = CrashPlan()
        self.published_id: Any = lambda: None
        self.calls: list[str] = []
        self.fail_next: list[errors.RotatorError] = []
        self.verify_attempts: dict[str, int] = {}

    # helpers for tests
    def add_foreign_key(self, user: str, status: model.KeyStatus = model.KeyStatus.ACTIVE) -> str:
        key = FakeKey(self._new_id(), pysecrets.token_hex(20), status, self.clock.now(), True)
        self.users.setdefault(user, []).append(key)
        return key.key_id

    def keys_of(self, user: str) -> list[FakeKey]:
        return list(self.users.get(user, []))

    def authenticates(self, key_id: str, secret: str) -> bool:
        for keys in self.users.values():
            for k in keys:
                if k.key_id == key_id:
                    return (
                        k.secret == secret
                        and k.status is model.KeyStatus.ACTIVE
                        and not k.broken
                        and self.clock.now() >= (k.ready_at or k.created)
                    )
        return False

    def _new_id(self) -> str:
        return f"AKIAFAKE{next(self._ids):012d}"

    def _call(self, name: str, mutating: bool = False) -> bool:
        self.calls.append(name)
        if self.fail_next:
            raise self.fail_next.pop(0)
        if not mutating:
            return False
        verdict = self.crash.tick()
        if verdict is False:
            raise Crash(name)
        return bool(verdict)

    def _find(self, user: str, key_id: str) -> FakeKey:
        for k in self.users.get(user, []):
            if k.key_id == key_id:
                return k
        raise errors.EimNoSuchEntity(f"no key {key_id}", code="NoSuchEntity")

    # Identity port: observation
    def account(self) -> str | None:
        self.account_calls += 1  # not in ``calls``: asked once a process, not once a pass
        return self.account_id

    def get_group(self, name: str) -> model.Group | None:
        self._call("ListAttachedGroupPolicies")
        if name not in self.groups:
            return None
        return model.Group(name, frozenset(self.group_policies.get(name, ())))

    def get_policy(self, name: str) -> model.Policy | None:
        self._call("GetPolicy")
        if name not in self.policies:
            return None
        default = self.default_version[name]
        versions = tuple(
            model.PolicyVersion(v, v == default, created) for v, _, created in self.policies[name]
        )
        doc = next(d for v, d, _ in self.policies[name] if v == default)
        return model.Policy(name, f"arn:fake:policy/{name}", default, doc, versions)

    def get_user(self, name: str) -> model.User | None:
        self._call("ListGroupsForUser")
        if name not in self.users:
            return None
        return model.User(
            name, frozenset(g for g, members in self.groups.items() if name in members)
        )

    # Identity port: changes
    def create_group(self, name: str) -> None:
        self._call("CreateGroup", True)
        if name in self.groups:
            raise errors.EimAlreadyExists(name, code="EntityAlreadyExists")
        self.groups[name] = set()

    def create_policy(
        self, name: str, description: str, document: Mapping[str, Any], path: str = "/"
    ) -> str:
        self._call("CreatePolicy", True)
        self.policy_paths[name] = path
        if name in self.policies:
            raise errors.EimAlreadyExists(name, code="EntityAlreadyExists")
        self.policies[name] = [("v1", dict(document), self.clock.now())]
        self.default_version[name] = "v1"
        return f"arn:fake:policy/{name}"

    def create_policy_version(self, arn: str, document: Mapping[str, Any]) -> None:
        self._call("CreatePolicyVersion", True)
        name = arn.rsplit("/", 1)[1]
        if len(self.policies[name]) >= 5:
            raise errors.EimQuotaExceeded("5 versions", code="LimitExceeded")
        vid = f"v{max(int(v[1:]) for v, _, _ in self.policies[name]) + 1}"
        self.policies[name].append((vid, dict(document), self.clock.now()))
        self.default_version[name] = vid

    def delete_policy_version(self, arn: str, version_id: str) -> None:
        self._call("DeletePolicyVersion", True)
        name = arn.rsplit("/", 1)[1]
        assert version_id != self.default_version[name]
        self.policies[name] = [v for v in self.policies[name] if v[0] != version_id]

    def attach_group_policy(self, group: str, arn: str) -> None:
        self._call("AttachGroupPolicy", True)
        self.group_policies.setdefault(group, set()).add(arn.rsplit("/", 1)[1])

    def create_user(self, name: str) -> None:
        self._call("CreateUser", True)
        if name in self.users:
            raise errors.EimAlreadyExists(name, code="EntityAlreadyExists")
        self.users[name] = []

    def add_user_to_group(self, user: str, group: str) -> None:
        self._call("AddUserToGroup", True)
        self.groups[group].add(user)

    # Identity port: keys
    def list_keys(self, user: str) -> list[model.AccessKey]:
        self._call("ListAccessKeys")
        if user not in self.users:
            raise errors.EimNoSuchEntity(f"no user {user}", code="NoSuchEntity")
        return [model.AccessKey(k.key_id, k.status, k.created) for k in self.users[user]]

    def create_key(self, user: str) -> model.NewKey:
        apply_then_crash = self._call("CreateAccessKey", True)
        keys = self.users[user]
        if len(keys) >= self.max_keys:
            raise InvariantBroken(
                f"CreateAccessKey with {len(keys)} keys (max_keys {self.max_keys})"
            )
        if len(keys) >= self.quota:
            raise errors.EimQuotaExceeded("AccessKeysPerUser", code="LimitExceeded")
        key = FakeKey(
            self._new_id(), pysecrets.token_hex(20), model.KeyStatus.ACTIVE, self.clock.now()
        )
        key.ready_at = key.created + self.propagation
        if self.break_next_keys:
            self.break_next_keys -= 1
            key.broken = True
        keys.append(key)
        if apply_then_crash:
            raise Crash("CreateAccessKey (response lost)")
        return model.NewKey(key.key_id, model.Secret(key.secret), key.created)

    def _check_touch(self, user: str, key_id: str, what: str) -> FakeKey:
        key = self._find(user, key_id)
        if key.foreign:
            raise InvariantBroken(f"{what} of foreign key {key_id}")
        if key_id == self.published_id():
            raise InvariantBroken(f"{what} of the published key {key_id}")
        return key

    def set_key_status(self, user: str, key_id: str, status: model.KeyStatus) -> None:
        apply_then_crash = self._call("UpdateAccessKey", True)
        key = self._check_touch(user, key_id, "UpdateAccessKey")
        key.status = status
        if apply_then_crash:
            raise Crash("UpdateAccessKey")

    def delete_key(self, user: str, key_id: str) -> None:
        apply_then_crash = self._call("DeleteAccessKey", True)
        key = self._check_touch(user, key_id, "DeleteAccessKey")
        self.users[user].remove(key)
        if apply_then_crash:
            raise Crash("DeleteAccessKey")

    def verify_key(self, key_id: str, secret: model.Secret) -> model.VerifyResult:
        self._call("Verify")
        self.verify_attempts[key_id] = self.verify_attempts.get(key_id, 0) + 1
        if self.authenticates(key_id, secret.reveal()):
            return model.VerifyResult(model.VerifyOutcome.VALID, "AccessDenied")
        return model.VerifyResult(model.VerifyOutcome.NOT_YET, "InvalidClientTokenId")


@dataclass
class _Doc:
    data: dict[str, Any]
    version: int


@dataclass
class FakeVault:
    iam: FakeIAM
    published: dict[str, _Doc] = field(default_factory=dict)
    states: dict[str, _Doc] = field(default_factory=dict)
    down: bool = False
    crash: CrashPlan | None = None  # shared with the IAM fake to count every mutating call
    writes: int = 0
    state_reads: int = 0
    published_history: list[str] = field(default_factory=list)
    # every version written through write_published or by_hand (KV v2 keeps old versions)
    published_versions: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    deny_list: bool = False  # a policy without `list` on the states

    def _check(self, mutating: bool = False) -> bool:
        if self.down:
            raise errors.VaultUnavailable("vault is down")
        if mutating and self.crash is not None:
            verdict = self.crash.tick()
            if verdict is False:
                raise Crash("vault write")
            return bool(verdict)
        return False

    def published_id(self, path: str) -> str | None:
        doc = self.published.get(path)
        return None if doc is None else doc.data.get("access_key_id")

    def published_secret(self, path: str) -> tuple[str, str] | None:
        doc = self.published.get(path)
        if doc is None:
            return None
        return doc.data["access_key_id"], doc.data.get("secret_access_key", "")

    def by_hand(self, path: str, data: dict[str, Any] | None) -> None:
        """A person writes ``data`` as a new version of the secret (None: a `kv delete`)."""
        doc = self.published.get(path)
        version = (doc.version if doc else 0) + (0 if data is None else 1)
        self.published[path] = _Doc({} if data is None else dict(data), version)
        if data is not None:
            self.published_versions.setdefault(path, {})[version] = dict(data)

    def check(self) -> None:
        self._check()

    def read_published(self, secret_path: str) -> model.Published:
        self._check()
        doc = self.published.get(secret_path)
        if doc is None:
            return model.Published(None, None, {}, 0)
        extra = {k: v for k, v in doc.data.items() if k not in model.Published.PUBLISHED_FIELDS}
        digest, missing = model.published_secret(doc.data)
        return model.Published(
            doc.data.get("access_key_id"),
            model.parse_time(doc.data["created_at"]) if "created_at" in doc.data else None,
            extra,
            doc.version,
            secret_digest=digest,
            secret_missing=missing,
        )

    def read_published_secret(
        self, secret_path: str, version: int | None = None
    ) -> tuple[str, model.Secret] | None:
        self._check()
        doc = self.published.get(secret_path)
        if doc is not None and version is not None and version != doc.version:
            data = self.published_versions.get(secret_path, {}).get(version)
            doc = None if data is None else _Doc(data, version)
        if doc is None:
            return None
        key_id, secret = doc.data.get("access_key_id"), doc.data.get("secret_access_key")
        if not key_id or not secret:
            return None
        return str(key_id), model.Secret(str(secret))

    def write_published(
        self, secret_path: str, key: model.NewKey, base: model.Published
    ) -> model.Published:
        apply_then_crash = self._check(True)
        current = self.published.get(secret_path)
        if (current.version if current else 0) != base.version:
            raise errors.VaultConflict("cas mismatch")
        if not self.iam.authenticates(key.key_id, key.secret.reveal()):
            raise InvariantBroken(f"published {key.key_id}, which does not authenticate")
        data = {
            **base.extra,
            "access_key_id": key.key_id,
            "secret_access_key": key.secret.reveal(),
            "created_at": model.format_time(key.created),
        }
        self.published[secret_path] = _Doc(data, base.version + 1)
        self.published_versions.setdefault(secret_path, {})[base.version + 1] = dict(data)
        self.published_history.append(key.key_id)
        if apply_then_crash:
            raise Crash("publish")
        return model.Published(
            key.key_id,
            key.created,
            dict(base.extra),
            base.version + 1,
            secret_digest=model.secret_digest(key.secret.reveal()),
        )

    def read_state(self, target: str) -> model.StoredState:
        self._check()
        self.state_reads += 1
        doc = self.states.get(target)
        if doc is None:
            return model.StoredState(model.TargetState(), 0)
        return model.StoredState(model.TargetState.from_document(doc.data), doc.version)

    def list_states(self) -> list[str]:
        self._check()
        if self.deny_list:
            raise errors.VaultDenied("Vault denied `list` on `secret/metadata/rotator/targets`")
        return sorted(self.states)

    def write_state(self, target: str, state: model.TargetState, version: int) -> int:
        apply_then_crash = self._check(True)
        current = self.states.get(target)
        if (current.version if current else 0) != version:
            raise errors.VaultConflict("cas mismatch")
        self.states[target] = _Doc(state.to_document(), version + 1)
        self.writes += 1
        if apply_then_crash:
            raise Crash("state write")
        return version + 1


@dataclass
class FakeLock:
    """Lease locks with the fake clock: one holder at a time until expiry."""

    clock: FakeClock
    leases: dict[str, tuple[str, datetime]] = field(default_factory=dict)

    writers: dict[str, str] = field(default_factory=dict)  # target -> holder of the last write

    def acquire(self, target: str, holder: str, ttl_seconds: float) -> model.Grant | None:
        current = self.leases.get(target)
        if current and current[0] != holder and current[1] > self.clock.now():
            return None
        self.leases[target] = (holder, self.clock.now() + timedelta(seconds=ttl_seconds))
        resumed = self.writers.get(target) == holder  # as the Vault adapter's check-and-set
        self.writers[target] = holder
        return model.Grant.RESUMED if resumed else model.Grant.TAKEN

    def renew(self, target: str, holder: str, ttl_seconds: float) -> bool:
        current = self.leases.get(target)
        if not current or current[0] != holder or current[1] <= self.clock.now():
            return False
        self.leases[target] = (holder, self.clock.now() + timedelta(seconds=ttl_seconds))
        return True

    def release(self, target: str, holder: str) -> None:
        if self.leases.get(target, ("",))[0] == holder:
            del self.leases[target]

    def holder(self, target: str) -> str | None:
        current = self.leases.get(target)
        return current[0] if current and current[1] > self.clock.now() else None
