"""The narrow interfaces the engine needs, in domain words.

``adapters/eim.py`` implements :class:`Identity` with boto3, ``adapters/vault.py`` implements
:class:`SecretStore` and :class:`Lock` with hvac; tests implement them with in-memory fakes.
Every method raises only :mod:`rotator.errors` exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from rotator import model


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, aware, UTC."""
        ...

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True if a stop was requested meanwhile (then return at once)."""
        ...


class Identity(Protocol):
    """EIM / IAM: the identities a target needs and the user's access keys."""

    @property
    def endpoint(self) -> str:
        """Where the calls go, as error messages name it."""
        ...

    # observation
    def account(self) -> str | None:
        """The account rotator's own credentials act in (None: IAM does not say)."""
        ...

    def get_group(self, name: str) -> model.Group | None: ...
    def get_policy(self, name: str) -> model.Policy | None: ...
    def get_user(self, name: str) -> model.User | None: ...

    # changes (never deletions of users, groups or policies)
    def create_group(self, name: str) -> None: ...
    def create_policy(
        self, name: str, description: str, document: Mapping[str, Any], path: str = "/"
    ) -> str:
        """Create the policy (under ``path``); returns its ARN (ORN on OUTSCALE)."""
        ...

    def create_policy_version(self, arn: str, document: Mapping[str, Any]) -> None:
        """Create a new version and make it the default."""
        ...

    def delete_policy_version(self, arn: str, version_id: str) -> None: ...
    def attach_group_policy(self, group: str, arn: str) -> None: ...
    def create_user(self, name: str) -> None: ...
    def add_user_to_group(self, user: str, group: str) -> None: ...

    # access keys
    def list_keys(self, user: str) -> list[model.AccessKey]: ...
    def create_key(self, user: str) -> model.NewKey: ...
    def set_key_status(self, user: str, key_id: str, status: model.KeyStatus) -> None: ...
    def delete_key(self, user: str, key_id: str) -> None: ...
    def verify_key(self, key_id: str, secret: model.Secret) -> model.VerifyResult:
        """Sign a cheap call with the key; VALID if it authenticated (even if not authorized)."""
        ...


class SecretStore(Protocol):
    """Vault KV v2: the published secrets and the rotator's private state."""

    def check(self) -> None:
        """Raise unless Vault is reachable, unsealed and the token is valid (readiness)."""
        ...

    def read_published(self, secret_path: str) -> model.Published: ...

    def read_published_secret(
        self, secret_path: str, version: int | None = None
    ) -> tuple[str, model.Secret] | None:
        """The key id and secret published at ``secret_path``, in its latest version or in
        ``version`` (None: absent, deleted or incomplete). Read only to move a target's
        published secret to a new path, or to restore it when it was overwritten."""
        ...

    def write_published(
        self, secret_path: str, key: model.NewKey, base: model.Published
    ) -> model.Published:
        """Write the key over ``base`` with check-and-set on ``base.version``, keeping
        ``base.extra``; returns what is now published. Raises VaultConflict if it changed."""
        ...

    def read_state(self, target: str) -> model.StoredState:
        """The target's state (version 0 and an empty state when there is none yet)."""
        ...

    def write_state(self, target: str, state: model.TargetState, version: int) -> int:
        """Write with check-and-set on ``version``; returns the new version."""
        ...

    def list_states(self) -> list[str]:
        """The names of the targets that have a state, configured or not."""
        ...


class Lock(Protocol):
    """Per-target lease locks in Vault (DESIGN.md section 3)."""

    def acquire(self, target: str, holder: str, ttl_seconds: float) -> model.Grant | None:
        """Take the lease (free, expired or already ours); None while another holder has it."""
        ...

    def renew(self, target: str, holder: str, ttl_seconds: float) -> bool: ...
    def release(self, target: str, holder: str) -> None: ...
    def holder(self, target: str) -> str | None: ...
