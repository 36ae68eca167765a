"""Vault (KV v2) implementation of :class:`ports.SecretStore` and :class:`ports.Lock`, over hvac.

The only module that imports hvac. Every hvac and requests exception is translated, in
:func:`_translate` and :meth:`VaultStore._forbidden`, into :mod:`rotator.errors`; nothing from
hvac crosses out of here, and no hvac ``Any`` leaks out of the small typed readers below.

Layout in the KV v2 mount (DESIGN.md section 1):

- published secret: ``<mount>/<secret_path>``, fields ``access_key_id``, ``secret_access_key``,
  ``created_at``; other fields are someone else's and are kept;
- rotator state: ``<mount>/<state_path>/targets/<target>``;
- locks: ``<mount>/<state_path>/locks/<target>`` holding ``holder`` and ``expires_at``.

Every write is check-and-set on the version read. This module must never put a token or a
secret in an exception message, and never return the published secret's value.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hvac
import hvac.exceptions
import requests
import structlog

from rotator import errors, model

log = structlog.get_logger("rotator.vault")

# --- how rotator authenticates -----------------------------------------------------------------


SecretSource = model.Secret | Callable[[], model.Secret]
"""A secret as is, or a callable returning its current value (re-read from its file each time,
so a rotated file is picked up without a restart; it may raise :class:`errors.ConfigError`)."""


def _current(source: SecretSource) -> model.Secret:
    return source if isinstance(source, model.Secret) else source()


@dataclass(frozen=True)
class TokenAuth:
    """A token given by the operator (``VAULT_TOKEN`` or ``vault.auth.token_file``).

    It cannot log in again; given as a callable, it is re-read by :meth:`VaultStore.refresh_token`
    and after a 403, so a new token written to the file is taken without a restart.
    """

    token: SecretSource
    origin: str = "VAULT_TOKEN or vault.auth.token_file"  # where the token comes from, for messages
    fix: str = ""  # how a new token reaches rotator from there ("" : every way, said generally)

    def current_token(self) -> model.Secret:
        return _current(self.token)


@dataclass(frozen=True)
class AppRoleAuth:
    """AppRole login; ``secret_id`` as a callable is re-read at every login."""

    role_id: str
    secret_id: SecretSource
    mount: str = "approle"

    def current_secret_id(self) -> model.Secret:
        return _current(self.secret_id)


@dataclass(frozen=True)
class KubernetesAuth:
    """Kubernetes login with the pod's service account token; ``jwt`` as a callable is re-read
    at every login (the kubelet rotates projected tokens)."""

    role: str
    jwt: SecretSource
    mount: str = "kubernetes"

    def current_jwt(self) -> model.Secret:
        return _current(self.jwt)


Auth = TokenAuth | AppRoleAuth | KubernetesAuth


# --- what a call does, for error messages --------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    """One Vault call: the ACL capability it needs on which API path, and what it is for."""

    capability: str  # read / create / update
    path: str  # API path after /v1/, as written in a policy: secret/data/rotator/targets/x
    purpose: str  # "read the published secret", "write the state of target x"...


class _Forbidden(Exception):
    """Internal: Vault answered 403; the caller decides between re-login and VaultDenied."""

    def __init__(self, cause: hvac.exceptions.Forbidden) -> None:
        super().__init__("forbidden")
        self.cause = cause


@dataclass(frozen=True)
class _Lease:
    holder: str
    expires_at: datetime | None  # None: unreadable, treated as expired
    released: bool

    def live(self, now: datetime) -> bool:
        return (
            bool(self.holder)
            and not self.released
            and self.expires_at is not None
            and now < self.expires_at
        )

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> _Lease | None:
        if data is None:
            return None
        expires: datetime | None
        try:
            expires = model.parse_time(str(data.get("expires_at", "")))
        except ValueError:
            expires = None
        return cls(
            holder=str(data.get("holder") or ""),
            expires_at=expires,
            released=bool(data.get("released_at")),
        )


# How long a refused login's credential is not sent again (by refusals in a row, unless it
# changes): Vault's lock-out (OpenBao: 5 refusals in 15 minutes lock the role for 15) is never
# reached, and a new secret id or JWT written to its file is tried at once.
LOGIN_HOLDS = (60.0, 300.0, 900.0)
# A clock this far from Vault's (beyond the call's own duration) is warned of: replicas judge
# each other's leases by their own clocks, so a skew near lock_ttl (15 s by default) lets two
# of them work on one target at once.
CLOCK_SKEW_WARN = 5.0


@dataclass(frozen=True)
class _Refused:
    """A refused login: what it sent, until when that is not sent again, why it was refused."""

    credential: model.Secret
    until: float  # time.monotonic()
    count: int  # refusals in a row of this credential
    message: str


@dataclass(frozen=True)
class _Held:
    """This store's own last write to a lock: who wrote it, its KV version, until when."""

    holder: str
    version: int
    expires_at: datetime | None
    released: bool


# --- the adapter -----------------------------------------------------------------------------


class VaultStore:
    """Published secrets, rotator state and per-target leases in one KV v2 mount.

    Thread-safe: the engine's workers share one instance. AppRole and Kubernetes log in lazily on
    first use, and once more (then retry the call once) when Vault answers 403, since the token
    may have expired or been revoked meanwhile; a token given as a callable is re-read then, and
    the call retried if it changed. :meth:`refresh_token`, called periodically, renews the token
    before it expires and logs in again before it reaches its max TTL.
    """

    def __init__(
        self,
        *,
        address: str,
        auth: Auth,
        mount: str = "secret",
        state_path: str = "rotator",
        ca_file: str | None = None,
        namespace: str | None = None,
        timeout: float = 10.0,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._address = _display_address(address)
        self._auth = auth
        self._mount = mount.strip("/")
        self._state_path = state_path.strip("/")
        self._now = now or _utc_now
        self._session = requests.Session()
        # The environment (HTTPS_PROXY / NO_PROXY, REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE) is read
        # once here rather than by requests on every call (a quarter of a read's CPU).
        self._session.trust_env = False
        self._session.proxies = requests.utils.get_environ_proxies(address)
        # hvac takes ``verify`` from a session it is given, so it is set here; True uses the
        # system CA bundle, never silently skips verification.
        verify = ca_file or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        self._session.verify = verify or True
        options: dict[str, Any] = {
            "url": address,
            "verify": verify or True,
            "timeout": timeout,
            "namespace": namespace,
            "session": self._session,
        }
        # token="" (not None): hvac would otherwise pick up VAULT_TOKEN or ~/.vault-token.
        self._client: Any = hvac.Client(token="", **options)
        # Logins go through a client that never carries a token, so a stale one is never sent.
        self._login_client: Any = hvac.Client(token="", **options)
        self._token: model.Secret | None = None
        self._login_lock = threading.Lock()  # held while the token is replaced
        self._refresh_lock = threading.Lock()  # one refresh_token() at a time
        self._leases: dict[str, _Held] = {}  # target -> this store's last write to its lock
        self._leases_lock = threading.Lock()
        self._expiring: set[str] = set()  # paths whose written version Vault will delete: warned
        self._refused: _Refused | None = None  # the last refused login, while it holds
        self._short_warned = False  # vault_token_short said
        self._mount_expires = False  # setup_warnings() saw delete_version_after on the mount
        self._skew_warned = False  # clock_skew said
        if isinstance(auth, TokenAuth) and isinstance(auth.token, model.Secret):
            self._set_token(auth.token)

    def __repr__(self) -> str:
        return f"VaultStore(address={self._address!r}, mount={self._mount!r}, auth={self._auth!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._session.close()

    def __enter__(self) -> VaultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- authentication ------------------------------------------------------------------

    def login(self) -> None:
        """Obtain a token from the auth method now (for a plain token: take it as given)."""
        with self._login_lock:
            self._login("requested")

    def _login(self, reason: str) -> bool:
        """The login itself; the caller holds ``_login_lock``. True if the token changed.

        A :class:`TokenAuth` cannot log in: its source is re-read, and the token changes only if
        the operator wrote a new one. AppRole and Kubernetes re-read their secret id / JWT too.
        """
        auth = self._auth
        first = self._token is None
        if isinstance(auth, TokenAuth):
            token = auth.current_token()
            if token == self._token:
                return False
            self._set_token(token)
            if not first:
                log.info("vault_token_reloaded", reason=reason)
            return True
        credential = _login_credential(auth)
        held = self._refused
        if held is not None and held.credential == credential and time.monotonic() < held.until:
            # Vault locks the role out after a few refused logins in a row (OpenBao: 5 in
            # 15 min, then 15 min): the same credential is not sent again before the hold ends
            raise errors.VaultDenied(
                f"{held.message} (not tried again with the same "
                f"{'secret_id' if isinstance(auth, AppRoleAuth) else 'token'} for "
                f"{held.until - time.monotonic():.0f}s, nor sooner unless it changes)"
            )
        try:
            response = _login_request(self._login_client, auth, credential)
        except (
            hvac.exceptions.Forbidden,
            hvac.exceptions.Unauthorized,
            hvac.exceptions.InvalidRequest,
            hvac.exceptions.InvalidPath,
        ) as exc:
            count = 1 if held is None or held.credential != credential else held.count + 1
            refused = self._login_refused(auth, exc, again=count > 1)
            hold = LOGIN_HOLDS[min(count, len(LOGIN_HOLDS)) - 1]
            self._refused = _Refused(credential, time.monotonic() + hold, count, str(refused))
            raise refused from exc
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            op = _Op("update", f"auth/{auth.mount}/login", f"log in with {_method(auth)}")
            raise _translate(op, exc, self._address, self._token_source()) from exc
        answer = _mapping(_mapping(response).get("auth"))
        issued = _text(answer.get("client_token"))
        if not issued:
            raise errors.VaultDenied(
                f"{_method(auth)} login at auth/{auth.mount}/login on {self._address} returned "
                f"no token: {_login_fix(auth)}"
            )
        self._set_token(model.Secret(issued))
        self._refused = None
        log.info(
            "vault_login" if first else "vault_relogin",
            method=_method(auth),
            mount=auth.mount,
            reason=reason,
            ttl=_seconds(answer.get("lease_duration")),
            renewable=answer.get("renewable") is True,
        )
        return True

    def refresh_token(self, *, period: float = 15.0) -> None:
        """Keep the token alive; call it every ``period`` seconds (any thread, passes running).

        Looks the token up. If its remaining TTL is at most ``max(creation TTL / 2, 2 * period)``
        (so one missed call still leaves time), renews it by its creation TTL, or by three
        periods if that is longer (Vault caps it at the token's max TTL). If it cannot be
        renewed, the renewal is refused, or the renewal gave less than asked (the token reached
        its max TTL): AppRole and Kubernetes log in again, re-reading the secret id / JWT; a
        static token raises :class:`errors.VaultDenied` saying when it expires and how to give a
        new one. A static token given as a callable is re-read first, so a new token written to
        its file is taken. A token Vault rejects (expired, revoked) makes AppRole and Kubernetes
        log in again and a static token raise VaultDenied. A token that never expires (root) is
        left alone. Calls in flight keep working meanwhile: the old token is not revoked.
        """
        with self._refresh_lock:
            if isinstance(self._auth, TokenAuth):
                with self._login_lock:
                    self._login("token source changed")
            info = self._lookup_ttl()
            current = self._token
            if info.ttl <= 0:
                return  # never expires
            threshold = max(info.creation_ttl / 2, 2 * period)
            if info.ttl > threshold:
                return
            remaining = info.ttl
            if not info.renewable:
                reason = "not renewable"
            else:
                # a TTL shorter than a few refresh periods would run out between two of them
                asked = max(info.creation_ttl, math.ceil(3 * period), 1)
                try:
                    renewed = self._renew_self(asked)
                except errors.VaultError as exc:
                    if exc.transient or isinstance(self._auth, TokenAuth):
                        raise
                    reason = "renewal refused"
                else:
                    # less than asked is no sign of the end when it is the token's own TTL:
                    # a periodic token is renewed to its period, whatever was asked
                    reached = renewed < max(info.creation_ttl, 1)
                    log.info(
                        "vault_token_renewed",
                        previous_ttl=info.ttl,
                        ttl=renewed,
                        asked=asked,
                        max_ttl_reached=reached,
                    )
                    if renewed <= period and not self._short_warned:
                        self._short_warned = True
                        log.warning(
                            "vault_token_short",
                            ttl=renewed,
                            refresh_period=period,
                            reason="the token lives less after a renewal than rotator waits "
                            "between two refreshes: it may expire in between",
                            fix=f"give it a TTL or period of {math.ceil(3 * period)}s or more",
                        )
                    if not reached:
                        return
                    remaining, reason = renewed, "max TTL reached"
            if not isinstance(self._auth, TokenAuth):
                assert current is not None  # the lookup went through with a token
                self._relogin(replacing=current, reason=reason)
                return
            if remaining > threshold:
                log.warning("vault_token_expiring", ttl=remaining, reason=reason)
                return
            raise errors.VaultDenied(self._static_token_expiring(remaining, reason))

    def _static_token_expiring(self, remaining: int, reason: str) -> str:
        why = "it reached its max TTL" if reason == "max TTL reached" else "it is not renewable"
        return (
            f"rotator's token for Vault at {self._address} expires in {remaining}s and cannot be "
            f"extended ({why}): {_static_fix(self._auth)}; a periodic token (token role with a "
            "period) has no max TTL, and AppRole or Kubernetes auth log in again by themselves"
        )

    def _lookup_ttl(self) -> _TokenTtl:
        data = _mapping(self._lookup_self().get("data"))
        return _TokenTtl(
            ttl=_seconds(data.get("ttl")),
            creation_ttl=_seconds(data.get("creation_ttl")),
            renewable=data.get("renewable") is True,
        )

    def _renew_self(self, increment: int) -> int:
        """Renew the token by ``increment`` seconds; the TTL Vault granted."""
        op = _Op("update", "auth/token/renew-self", "renew rotator's own token")
        answer = self._call(op, lambda client: client.auth.token.renew_self(increment=increment))
        return _seconds(_mapping(_mapping(answer).get("auth")).get("lease_duration"))

    def token_ttl(self) -> int | None:
        """Seconds the current token has left; None if it never expires (a root token)."""
        info = self._lookup_self()
        ttl = _mapping(info.get("data")).get("ttl")
        return ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > 0 else None

    def check(self) -> None:
        """Raise unless Vault is reachable, unsealed, the token valid and the mount KV v2."""
        self._lookup_self()
        self._check_mount()

    def setup_warnings(self) -> list[str]:
        """What in the mount's KV settings works against rotator ([] when the policy does not
        grant reading ``<mount>/config``: the check is then skipped)."""
        op = _Op("read", f"{self._mount}/config", f"read the settings of the mount {self._mount}/")
        try:
            answer = self._call(
                op, lambda client: client.secrets.kv.v2.read_configuration(mount_point=self._mount)
            )
        except errors.VaultDenied:
            return []
        settings = _mapping(_mapping(answer).get("data"))
        warnings = []
        after = _go_seconds(settings.get("delete_version_after"))
        self._mount_expires = bool(after)  # said here once: not again for each path
        if after:
            warnings.append(
                f"the mount {self._mount}/ deletes every version {after:g}s after it is written "
                "(delete_version_after): rotator's states would then be refused as deleted, and "
                "each target given a new key whenever its secret goes. Unset it: `bao write "
                f"{self._mount}/config delete_version_after=0s`"
            )
        if settings.get("max_versions") == 1:
            warnings.append(
                f"the mount {self._mount}/ keeps one version of each secret (max_versions 1): "
                "the roll-back to the previous version of a published secret (docs/runbook.md) "
                f"is impossible. Keep 2 or more: `bao write {self._mount}/config max_versions=0` "
                "(Vault's default, 10)"
            )
        return warnings

    # --- SecretStore ---------------------------------------------------------------------

    def read_published(self, secret_path: str) -> model.Published:
        path = secret_path.strip("/")
        data, version = self._kv_read(path, "read the published secret")
        if data is None:
            return model.Published(None, None, {}, version=version)
        extra = {k: v for k, v in data.items() if k not in model.Published.PUBLISHED_FIELDS}
        key_id = data.get("access_key_id")
        digest, missing = model.published_secret(data)
        return model.Published(
            access_key_id=None if key_id in (None, "") else str(key_id),
            created_at=_lenient_time(data.get("created_at")),
            extra=extra,
            version=version,
            secret_digest=digest,
            secret_missing=missing,
        )

    def read_published_secret(
        self, secret_path: str, version: int | None = None
    ) -> tuple[str, model.Secret] | None:
        purpose = "read the published secret" + ("" if version is None else f" (v{version})")
        data, _ = self._kv_read(secret_path.strip("/"), purpose, version=version)
        if data is None:
            return None
        key_id, secret = data.get("access_key_id"), data.get("secret_access_key")
        if not isinstance(key_id, str) or not isinstance(secret, str) or not key_id or not secret:
            return None
        return key_id, model.Secret(secret)

    def write_published(
        self, secret_path: str, key: model.NewKey, base: model.Published
    ) -> model.Published:
        path = secret_path.strip("/")
        data = {
            **base.extra,
            "access_key_id": key.key_id,
            "secret_access_key": key.secret.reveal(),
            "created_at": model.format_time(key.created),
        }
        version = self._kv_write(
            path,
            data,
            base.version,
            "publish the new key",
            expiring="consumers lose the key then, and rotator makes a new one each time",
        )
        return model.Published(
            access_key_id=key.key_id,
            created_at=model.utc(key.created),
            extra=dict(base.extra),
            version=version,
            secret_digest=model.secret_digest(key.secret.reveal()),
        )

    def read_state(self, target: str) -> model.StoredState:
        path = self._state(target)
        data, version = self._kv_read(path, f"read the state of target {target}")
        if data is None and version > 0:
            raise errors.StateDeleted(
                f"the latest version ({version}) of the state of target {target} "
                f"({self._mount}/data/{path}) was deleted: by a `kv delete`, or by Vault's "
                "delete_version_after on the mount or the path. rotator will not take it for "
                "no state, which would leave the keys it tracks untracked. Undelete it "
                f"(`bao kv undelete -mount={self._mount} -versions={version} {path}`) and unset "
                "delete_version_after for rotator's paths; to start the target over on "
                f"purpose, remove the whole state (`bao kv metadata delete -mount={self._mount} "
                f"{path}`)"
            )
        if data is None:
            return model.StoredState(model.TargetState(), version)
        return model.StoredState(model.TargetState.from_document(data), version)

    def write_state(self, target: str, state: model.TargetState, version: int) -> int:
        return self._kv_write(
            self._state(target),
            state.to_document(),
            version,
            f"write the state of target {target}",
            expiring="the state is then refused as deleted and the target stops until it is "
            "undeleted",
        )

    def list_states(self) -> list[str]:
        """The targets that have a state (LIST on the metadata of ``<state_path>/targets/``)."""
        path = f"{self._state_path}/targets"
        op = _Op("list", f"{self._mount}/metadata/{path}", "list the targets that have a state")

        def call(client: Any) -> Any:
            try:
                return client.secrets.kv.v2.list_secrets(path=path, mount_point=self._mount)
            except hvac.exceptions.InvalidPath as exc:
                if _missing_route(exc):
                    raise
                return {}  # no state at all yet

        keys = _mapping(_mapping(self._call(op, call)).get("data")).get("keys") or []
        if not isinstance(keys, list):
            raise self._not_kv_v2()
        return sorted(str(k) for k in keys if isinstance(k, str) and not k.endswith("/"))

    # --- Lock ----------------------------------------------------------------------------

    def acquire(self, target: str, holder: str, ttl_seconds: float) -> model.Grant | None:
        """Take the lease if it is free, expired or already ours; None if someone holds it.

        The version of this store's own last write to the lock is remembered: the next acquire
        by the same holder first writes with check-and-set on it, without reading. When that
        succeeds nobody wrote the lock in between (``Grant.RESUMED``); when it conflicts, the
        lock is read and taken as usual (``Grant.TAKEN``).
        """
        now = self._now()
        expires = now + timedelta(seconds=ttl_seconds)
        mine = self._held_by(target, holder)
        if mine is not None and self._write_lease(target, mine.version, holder, expires):
            return model.Grant.RESUMED
        lease, version = self._read_lease(target)
        now = self._now()
        if lease is not None and lease.live(now) and lease.holder != holder:
            return None
        if not self._write_lease(target, version, holder, now + timedelta(seconds=ttl_seconds)):
            return None
        return model.Grant.TAKEN

    def renew(self, target: str, holder: str, ttl_seconds: float) -> bool:
        """Extend our lease; False if it is no longer ours or has expired.

        No read: the write is check-and-set on this store's own last write, so it fails if
        anyone wrote the lock since. An expired lease is not renewed even if nobody took it: the
        holder was not protected for a while, so it must stop and acquire again.
        """
        mine = self._held_by(target, holder)
        now = self._now()
        if mine is None or mine.released or mine.expires_at is None or now >= mine.expires_at:
            return False
        return self._write_lease(target, mine.version, holder, now + timedelta(seconds=ttl_seconds))

    def release(self, target: str, holder: str) -> None:
        """Give the lease up if it is ours (a conflict means it was not ours any more)."""
        mine = self._held_by(target, holder)
        if mine is None or mine.released:
            return
        now = self._now()
        data = {
            "holder": holder,
            "expires_at": model.format_time(now),
            "released_at": model.format_time(now),
        }
        try:
            version = self._kv_write(
                self._lock(target), data, mine.version, f"release the lock of {target}"
            )
        except errors.VaultConflict:
            self._forget_lease(target)
            return
        self._remember_lease(target, _Held(holder, version, None, released=True))

    def holder(self, target: str) -> str | None:
        lease, _ = self._read_lease(target)
        return lease.holder if lease is not None and lease.live(self._now()) else None

    def _read_lease(self, target: str) -> tuple[_Lease | None, int]:
        data, version = self._kv_read(self._lock(target), f"read the lock of target {target}")
        return _Lease.parse(data), version

    def _write_lease(self, target: str, version: int, holder: str, expires: datetime) -> bool:
        data = {"holder": holder, "expires_at": model.format_time(expires)}
        try:
            written = self._kv_write(
                self._lock(target), data, version, f"take the lock of target {target}"
            )
        except errors.VaultConflict:
            self._forget_lease(target)
            return False  # another replica wrote the lock since: it won
        self._remember_lease(target, _Held(holder, written, expires, released=False))
        return True

    def _held_by(self, target: str, holder: str) -> _Held | None:
        with self._leases_lock:
            mine = self._leases.get(target)
        return mine if mine is not None and mine.holder == holder else None

    def _remember_lease(self, target: str, held: _Held) -> None:
        with self._leases_lock:
            self._leases[target] = held

    def _forget_lease(self, target: str) -> None:
        with self._leases_lock:
            self._leases.pop(target, None)

    # --- paths -------------------------------------------------------------------------------

    def _state(self, target: str) -> str:
        return f"{self._state_path}/targets/{target}"

    def _lock(self, target: str) -> str:
        return f"{self._state_path}/locks/{target}"

    # --- KV v2 -------------------------------------------------------------------------------

    def _kv_read(
        self, path: str, purpose: str, *, version: int | None = None
    ) -> tuple[dict[str, Any] | None, int]:
        """(data, version) of the latest version (or of ``version``); (None, version) if it was
        deleted or destroyed, so check-and-set can still write over it; (None, 0) if nothing
        is there."""
        op = _Op("read", f"{self._mount}/data/{path}", purpose)

        def call(client: Any) -> Any:
            try:
                return client.secrets.kv.v2.read_secret_version(
                    path=path,
                    version=version,
                    mount_point=self._mount,
                    raise_on_deleted_version=True,
                )
            except hvac.exceptions.InvalidPath as exc:
                if _missing_route(exc):
                    raise
                # A 404 with metadata is a deleted or destroyed version; without, no secret.
                # KV v2 says nothing more; another engine's "unsupported path" is no answer.
                body = exc.json if isinstance(exc.json, dict) else {}
                if "data" not in body and any(exc.errors or ()):
                    raise self._not_kv_v2() from None
                return body

        body = _mapping(self._call(op, call)).get("data")
        if body is None:
            return None, 0
        metadata = _mapping(body).get("metadata")
        if not isinstance(metadata, dict):
            raise self._not_kv_v2()
        version = _version(metadata.get("version"))
        data = _mapping(body).get("data")
        if not isinstance(data, dict):
            return None, version
        return data, version

    def _kv_write(
        self, path: str, data: Mapping[str, Any], cas: int, purpose: str, *, expiring: str = ""
    ) -> int:
        """Write with check-and-set on ``cas``; returns the new version.

        ``expiring``: what Vault deleting this version would do; said once per path when the
        version written has a deletion time (delete_version_after on the path or the mount)."""
        op = _Op("create" if cas == 0 else "update", f"{self._mount}/data/{path}", purpose)

        def call(client: Any) -> Any:
            return client.secrets.kv.v2.create_or_update_secret(
                path=path, secret=dict(data), cas=cas, mount_point=self._mount
            )

        sent = _wall_clock()
        response = self._call(op, call)
        answered = _wall_clock()
        if not isinstance(response, dict):
            # A KV v1 engine accepts the write (204, no version): the mount is the wrong kind.
            raise self._not_kv_v2()
        written = _mapping(response.get("data"))
        version = _version(written.get("version"))
        self._check_clock(_lenient_time(written.get("created_time")), sent, answered)
        deletion = _text(written.get("deletion_time"))
        if expiring and deletion and not self._mount_expires and path not in self._expiring:
            self._expiring.add(path)
            log.warning(
                "vault_version_expires",
                path=f"{self._mount}/data/{path}",
                version=version,
                deletion_time=deletion,
                reason=f"Vault deletes this version then (delete_version_after): {expiring}",
                fix=f"bao kv metadata put -mount={self._mount} -delete-version-after=0s {path}, "
                f"and unset it on the mount if set there (bao read {self._mount}/config)",
            )
        return version

    def _check_clock(self, vault_time: datetime | None, sent: float, answered: float) -> None:
        """Warn once when this host's clock is off Vault's (the time Vault gave a write it
        answered between ``sent`` and ``answered``, this host's times)."""
        if vault_time is None or self._skew_warned:
            return
        vault = vault_time.timestamp()
        if sent - CLOCK_SKEW_WARN <= vault <= answered + CLOCK_SKEW_WARN:
            return
        self._skew_warned = True
        skew = (sent + answered) / 2 - vault
        log.warning(
            "clock_skew",
            skew_seconds=round(skew, 1),
            note=f"this host's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
            "Vault's: replicas judge each other's leases by their own clocks, so a skew near "
            "vault.lock_ttl lets two of them work on one target at once (check-and-set still "
            "guards the writes, at the cost of failed passes), and EIM refuses signatures more "
            "than 5 minutes off. Keep every host's clock synchronised (NTP, chrony, "
            "systemd-timesyncd)",
        )

    def _not_kv_v2(self) -> errors.VaultError:
        return errors.VaultError(
            f"the secrets engine at {self._mount}/ on {self._address} is not KV version 2: "
            f"set vault.mount to a KV v2 mount, or enable one there "
            f"(`bao secrets enable -path={self._mount} kv-v2`)"
        )

    def _check_mount(self) -> None:
        path = f"sys/internal/ui/mounts/{self._mount}"
        op = _Op("read", path, f"look up the mount {self._mount}/")
        try:
            info = _mapping(self._call(op, lambda client: client.adapter.get(f"/v1/{path}")))
        except errors.VaultDenied as exc:
            raise errors.VaultError(
                f"no secrets engine visible at {self._mount}/ on {self._address}: either none "
                f"is mounted there (enable a KV v2 engine: `bao secrets enable -path="
                f"{self._mount} kv-v2`) or the token's policy grants nothing under it "
                f"(grant the rotator policy on {self._mount}/data/{self._state_path}/*)"
            ) from exc
        mount = _mapping(info.get("data"))
        version = str(_mapping(mount.get("options")).get("version") or "1")
        if mount.get("type") != "kv" or version != "2":
            raise self._not_kv_v2()

    def _lookup_self(self) -> dict[str, Any]:
        op = _Op("read", "auth/token/lookup-self", "look up rotator's own token")
        # The answer holds the token itself (``data.id``): only typed fields are taken from it.
        return _mapping(self._call(op, lambda client: client.auth.token.lookup_self()))

    # --- calling Vault -------------------------------------------------------------------

    def _call(self, op: _Op, call: Callable[[Any], Any]) -> Any:
        """Run ``call`` with a token, re-login once on 403 when the method allows, translate.

        A static token "logs in again" only if re-reading its source gives another token.
        """
        used = self._ensure_token()
        try:
            return self._attempt(op, call)
        except _Forbidden as denied:
            rejected = denied.cause
        # A token Vault still knows was denied by a policy: a fresh login (a use of the secret
        # id, a new token left behind) would be denied the same.
        if op.path != "auth/token/lookup-self" and self._token is used and self._token_valid():
            raise self._forbidden(op, rejected, relogged=False, token_valid=True) from rejected
        if not self._relogin(replacing=used, reason="token rejected"):
            raise self._forbidden(op, rejected, relogged=False) from rejected
        try:
            return self._attempt(op, call)
        except _Forbidden as denied:
            raise self._forbidden(op, denied.cause, relogged=True) from denied.cause

    def _attempt(self, op: _Op, call: Callable[[Any], Any]) -> Any:
        try:
            return call(self._client)
        except hvac.exceptions.Forbidden as exc:
            raise _Forbidden(exc) from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise _translate(op, exc, self._address, self._token_source()) from exc

    def _ensure_token(self) -> model.Secret:
        token = self._token
        if token is not None:
            return token
        with self._login_lock:
            if self._token is None:
                self._login("first use")
            assert self._token is not None  # _login() sets it or raises
            return self._token

    def _relogin(self, replacing: model.Secret, reason: str) -> bool:
        """Replace the token ``replacing``; True if another one is now in use."""
        with self._login_lock:
            if self._token is not replacing:  # another thread logged in already
                return True
            return self._login(reason)

    def _set_token(self, token: model.Secret) -> None:
        # The client first: a thread that reads the new ``_token`` then sends the new token.
        self._client.token = token.reveal()
        self._token = token

    def _token_source(self) -> str:
        auth = self._auth
        if isinstance(auth, TokenAuth):
            return f"the token comes from {auth.origin}: {_static_fix(auth)}"
        if isinstance(auth, AppRoleAuth):
            return (
                f"the token comes from AppRole login at auth/{auth.mount}: check the role's "
                "token_ttl and token_num_uses (vault.auth.approle)"
            )
        return (
            f"the token comes from Kubernetes login at auth/{auth.mount}: check the role's "
            "token_ttl (vault.auth.kubernetes)"
        )

    def _token_valid(self) -> bool | None:
        """Whether Vault still knows the current token (None: could not tell)."""
        try:
            self._client.auth.token.lookup_self()
        except hvac.exceptions.Forbidden:
            return False
        except (hvac.exceptions.VaultError, requests.RequestException):
            return None
        return True

    def _forbidden(
        self,
        op: _Op,
        exc: hvac.exceptions.Forbidden,
        *,
        relogged: bool,
        token_valid: bool | None = None,
    ) -> errors.VaultDenied:
        """A 403 means a bad token or a policy that does not grant the path: tell which."""
        if token_valid is None:
            token_valid = False if op.path == "auth/token/lookup-self" else self._token_valid()
        if token_valid is False:
            again = ""
            if relogged:
                again = (
                    " even after re-reading its source"
                    if isinstance(self._auth, TokenAuth)
                    else " even right after a fresh login"
                )
            return errors.VaultDenied(
                f"Vault at {self._address} rejected rotator's token{again} (invalid, expired or "
                f"revoked, or without the default policy) when trying to {op.purpose}: "
                f"{self._token_source()}"
            )
        return errors.VaultDenied(
            f"Vault at {self._address} denied `{op.capability}` on `{op.path}` (to {op.purpose}): "
            f"the policy of rotator's token does not grant it; add it to the rotator policy, "
            f'e.g. path "{op.path}" {{ capabilities = ["{op.capability}", ...] }}'
            f"{_new_policy_note(self._auth)} ({_vault_said(exc)})"
        )

    def _login_refused(
        self, auth: AppRoleAuth | KubernetesAuth, exc: hvac.exceptions.VaultError, *, again: bool
    ) -> errors.VaultDenied:
        if _missing_route(exc):
            fix = f"no auth method is enabled at auth/{auth.mount}: enable it or fix its mount"
        else:
            fix = _login_fix(auth)
            if again:  # a login refused before this one (other rotators may share the role)
                fix += (
                    "; after several refused logins Vault refuses every login of the role for a "
                    "while, even a good one (OpenBao: 15 min after 5): `bao read "
                    "sys/locked-users` shows it, `bao write sys/locked-users/<auth mount "
                    "accessor>/unlock/<role_id or service account>` lifts it"
                )
        return errors.VaultDenied(
            f"{_method(auth)} login at auth/{auth.mount}/login on {self._address} was refused "
            f"({_vault_said(exc)}): {fix}"
        )


# --- logging in ----------------------------------------------------------------------------------

_STATIC_AUTH_FIX = (
    "issue a new token and write it to vault.auth.token_file (re-read without a restart), or "
    "set VAULT_TOKEN and restart rotator"
)


def _new_policy_note(auth: Auth) -> str:
    """A policy added to the role (not rules added to its policy) reaches a token at login."""
    if isinstance(auth, TokenAuth):
        return ""
    return (
        " (rules added to a policy the token has apply at once; a policy added to the "
        f"{_method(auth)} role applies from rotator's next login: restart it)"
    )


def _static_fix(auth: object) -> str:
    """How to hand rotator a new static token (the way its token came, when known)."""
    return auth.fix if isinstance(auth, TokenAuth) and auth.fix else _STATIC_AUTH_FIX


@dataclass(frozen=True)
class _TokenTtl:
    """The typed part of lookup-self (its answer also holds the token itself: never kept)."""

    ttl: int  # seconds left; 0: never expires
    creation_ttl: int
    renewable: bool


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def _go_seconds(value: object) -> float:
    """Seconds in a Go duration as Vault writes it ("0s", "8s", "1h30m0s"); 0 if unreadable."""
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return 0.0
    return sum(
        float(amount) * _GO_UNIT_SECONDS[unit] for amount, unit in _GO_DURATION_PART.findall(value)
    )


def _login_credential(auth: AppRoleAuth | KubernetesAuth) -> model.Secret:
    """The secret id or JWT a login sends now (re-read from its file)."""
    return auth.current_secret_id() if isinstance(auth, AppRoleAuth) else auth.current_jwt()


def _login_request(
    client: Any, auth: AppRoleAuth | KubernetesAuth, credential: model.Secret
) -> Any:
    """POST the login; the token is taken from the answer, never kept in ``client``."""
    if isinstance(auth, AppRoleAuth):
        return client.auth.approle.login(
            role_id=auth.role_id,
            secret_id=credential.reveal(),
            use_token=False,
            mount_point=auth.mount,
        )
    return client.auth.kubernetes.login(
        role=auth.role, jwt=credential.reveal(), use_token=False, mount_point=auth.mount
    )


def _method(auth: AppRoleAuth | KubernetesAuth) -> str:
    return "AppRole" if isinstance(auth, AppRoleAuth) else "Kubernetes"


def _login_fix(auth: AppRoleAuth | KubernetesAuth) -> str:
    if isinstance(auth, AppRoleAuth):
        return (
            "check vault.auth.approle: role_id and secret_id (a secret_id may expire or be used "
            "up: issue a new one)"
        )
    return (
        "check vault.auth.kubernetes: the role, the service account and namespace it is bound "
        "to, and the auth method's kubernetes_host"
    )


# --- translation and typed readers -------------------------------------------------------------


def _translate(
    op: _Op,
    exc: hvac.exceptions.VaultError | requests.RequestException,
    address: str,
    token_source: str,
) -> errors.VaultError:
    """The project's error for a failed call (403 is handled by the caller, which knows more)."""
    what = f"to {op.purpose} (`{op.capability}` on `{op.path}`)"
    if isinstance(exc, requests.exceptions.SSLError) and errors.speaks_no_tls(exc):
        return errors.VaultUnavailable(
            f"Vault at {address} does not speak TLS {what} (it answered the TLS handshake in "
            "plain HTTP): is vault.address meant to be http://?"
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return errors.VaultUnavailable(
            f"TLS with Vault at {address} failed {what}: set vault.ca_file to the CA that "
            "signed Vault's certificate, and check vault.address's host name"
        )
    if isinstance(
        exc,
        requests.exceptions.InvalidURL
        | requests.exceptions.MissingSchema
        | requests.exceptions.InvalidSchema,
    ):
        return errors.VaultError(
            f"vault.address {address!r} is not a usable URL: write it as https://host:8200"
        )
    if isinstance(exc, requests.RequestException):
        return errors.VaultUnavailable(
            f"Vault at {address} is unreachable ({type(exc).__name__}) {what}: check that it "
            "runs, vault.address, the network and firewalls in between"
        )
    said = _vault_said(exc)
    if isinstance(exc, hvac.exceptions.VaultDown):
        return errors.VaultUnavailable(
            f"Vault at {address} is sealed or unavailable ({said}) {what}: unseal it "
            "(`bao operator unseal`) or check its health"
        )
    if isinstance(exc, hvac.exceptions.VaultNotInitialized):
        return errors.VaultUnavailable(
            f"Vault at {address} is not initialized {what}: initialize and unseal it"
        )
    if isinstance(
        exc,
        hvac.exceptions.InternalServerError
        | hvac.exceptions.BadGateway
        | hvac.exceptions.RateLimitExceeded
        | hvac.exceptions.UnexpectedError,
    ):
        return errors.VaultUnavailable(
            f"Vault at {address} failed {what} ({type(exc).__name__}: {said}): check Vault's "
            "health and logs"
        )
    if isinstance(exc, hvac.exceptions.Unauthorized):
        return errors.VaultDenied(
            f"Vault at {address} rejected rotator's token as invalid or expired {what}: "
            f"{token_source}"
        )
    if isinstance(exc, hvac.exceptions.InvalidRequest) and "check-and-set" in said:
        return errors.VaultConflict(
            f"`{op.path}` changed since rotator read it (check-and-set lost, {what}): another "
            "replica or a person wrote it; the next pass re-reads it"
        )
    if isinstance(exc, hvac.exceptions.InvalidPath) and _missing_route(exc):
        mount = op.path.split("/", 1)[0]
        return errors.VaultError(
            f"nothing is mounted at {mount}/ on Vault at {address} {what}: enable a KV v2 "
            f"engine there (`bao secrets enable -path={mount} kv-v2`) or fix vault.mount"
        )
    return errors.VaultError(f"Vault at {address} refused {what} ({type(exc).__name__}: {said})")


def _missing_route(exc: hvac.exceptions.VaultError) -> bool:
    """Vault's 404 for a path under no mount at all ("no handler for route")."""
    return isinstance(exc, hvac.exceptions.InvalidPath) and "no handler for route" in _vault_said(
        exc
    )


def _vault_said(exc: hvac.exceptions.VaultError) -> str:
    """Vault's own error text, short, with anything that looks like a known secret removed."""
    raw = exc.errors if isinstance(exc.errors, list) else [exc.args[0] if exc.args else ""]
    text = " ".join(" ".join(str(e).split()) for e in raw if e) or "no detail"
    for secret in model.Secret.find_in(text):  # longest first
        text = text.replace(secret, "**********")
    return text[:300]


def _mapping(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else empty (hvac answers are untyped)."""
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _seconds(value: object) -> int:
    """A TTL in whole seconds from an answer; 0 if absent or not a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0


def _version(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise errors.VaultError(f"Vault returned a KV version that is not a number: {value!r}")


def _wall_clock() -> float:
    """This host's clock (the one compared with Vault's)."""
    return time.time()


def _lenient_time(value: object) -> datetime | None:
    """A time written by someone else may be anything: unreadable counts as unknown."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return model.parse_time(value)
    except ValueError:
        return None


def _display_address(address: str) -> str:
    """The address for messages, without any user:password part."""
    parts = urlsplit(address)
    if parts.username is None and parts.password is None:
        return address
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _utc_now() -> datetime:
    return datetime.now(UTC)
