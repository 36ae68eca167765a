"""The identity a target needs, as pure decisions: desired vs observed -> changes to make.

A target may manage its EIM group, the group's managed policy (with the wanted document) and
attachment, the user and the user's membership. Nothing is ever deleted: users, groups and
policies may be shared or managed by people, so rotator only adds what is missing and, when the
policy's default version drifted, adds a new default version (removing the oldest non-default
version first when EIM's limit of five is reached). No I/O, no clock, no logging.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rotator import model

POLICY_VERSION_LIMIT = 5


@dataclass(frozen=True)
class WantedPolicy:
    name: str
    document: Mapping[str, Any]
    description: str = ""
    path: str = "/"


@dataclass(frozen=True)
class Desired:
    """What one target wants to exist. ``group`` None: the user is managed elsewhere."""

    user: str
    group: str | None = None
    policy: WantedPolicy | None = None
    manage_user: bool = True

    def digest(self) -> str:
        """A stable digest of the wanted identity, kept in state to notice config changes."""
        body = {
            "user": self.user,
            "group": self.group,
            "manage_user": self.manage_user,
            "policy": None
            if self.policy is None
            else {
                "name": self.policy.name,
                "description": self.policy.description,
                "path": self.policy.path,
                "document": self.policy.document,
            },
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class ChangeKind(enum.StrEnum):
    CREATE_GROUP = "create_group"
    CREATE_POLICY = "create_policy"
    DELETE_POLICY_VERSION = "delete_policy_version"
    CREATE_POLICY_VERSION = "create_policy_version"
    ATTACH_POLICY = "attach_policy"
    CREATE_USER = "create_user"
    ADD_USER_TO_GROUP = "add_user_to_group"


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    subject: str  # the group, policy or user name
    reason: str
    version_id: str | None = None  # DELETE_POLICY_VERSION
    document: Mapping[str, Any] = field(default_factory=dict)  # CREATE_POLICY(_VERSION)
    description: str = ""  # CREATE_POLICY
    path: str = "/"  # CREATE_POLICY
    group: str | None = None  # ATTACH_POLICY, ADD_USER_TO_GROUP

    def describe(self) -> str:
        return f"{self.kind.value} {self.subject}: {self.reason}"


def plan(
    desired: Desired,
    group: model.Group | None,
    policy: model.Policy | None,
    user: model.User | None,
) -> tuple[Change, ...]:
    """The changes that make IAM match ``desired``, in the order they must be applied."""
    changes: list[Change] = []
    if desired.group is not None and group is None:
        changes.append(Change(ChangeKind.CREATE_GROUP, desired.group, "group is missing"))
    wanted = desired.policy
    if wanted is not None and desired.group is not None:
        if policy is None:
            changes.append(
                Change(
                    ChangeKind.CREATE_POLICY,
                    wanted.name,
                    "policy is missing",
                    document=wanted.document,
                    description=wanted.description,
                    path=wanted.path,
                )
            )
        elif not same_document(policy.document, wanted.document):
            non_default = sorted(
                (v for v in policy.versions if not v.is_default), key=lambda v: v.created
            )
            if len(policy.versions) >= POLICY_VERSION_LIMIT and non_default:
                oldest = non_default[0]
                changes.append(
                    Change(
                        ChangeKind.DELETE_POLICY_VERSION,
                        wanted.name,
                        f"make room: {POLICY_VERSION_LIMIT} versions is EIM's limit",
                        version_id=oldest.version_id,
                    )
                )
            changes.append(
                Change(
                    ChangeKind.CREATE_POLICY_VERSION,
                    wanted.name,
                    f"default version {policy.default_version_id} differs from the wanted document",
                    document=wanted.document,
                )
            )
        if group is None or wanted.name not in group.attached_policies:
            changes.append(
                Change(
                    ChangeKind.ATTACH_POLICY,
                    wanted.name,
                    f"policy is not attached to group {desired.group}",
                    group=desired.group,
                )
            )
    if user is None and desired.manage_user:
        changes.append(Change(ChangeKind.CREATE_USER, desired.user, "user is missing"))
    if desired.group is not None and (user is None or desired.group not in user.groups):
        changes.append(
            Change(
                ChangeKind.ADD_USER_TO_GROUP,
                desired.user,
                f"user is not a member of group {desired.group}",
                group=desired.group,
            )
        )
    return tuple(changes)


def same_document(observed: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Compare parsed policy documents; a lone string equals a one-element list (IAM folds them)."""
    same: bool = _normal(observed) == _normal(wanted)
    return same


def _normal(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_normal(v) for v in value]
        return items[0] if len(items) == 1 else items
    return value
