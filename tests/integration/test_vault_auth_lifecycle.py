"""VaultStore's own token over time, against a real OpenBao with TTLs of seconds.

``refresh_token`` renews a token before it expires, logs in again (AppRole, Kubernetes) when a
renewal no longer extends it (max TTL), re-reads the secret id / JWT / token file on each login,
and says clearly when a static token cannot be kept alive. No token, secret id or JWT ever
appears in an exception or in the log output.

The loops below wait for wall time to pass (TTLs are the subject), each bounded by a deadline and
ending on a condition checked against Vault.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac
import pytest
import structlog
from structlog.types import EventDict, WrappedLogger

from rotator import config, errors, log, model
from rotator.adapters import vault as vault_adapter
from rotator.adapters.vault import AppRoleAuth, KubernetesAuth, TokenAuth, VaultStore
from tests.support import kubernetes_standin
from tests.support.kubernetes_standin import ServiceAccount, TokenReviewStandIn
from tests.support.openbao import VaultFixture

MakeStore = Callable[..., VaultStore]

POLL = 0.2  # seconds between two steps of a deadline-bounded loop


# --- helpers -----------------------------------------------------------------------------------


@dataclass
class Logs:
    """rotator's log output while a test runs: rendered JSON lines, and the raw events."""

    stream: io.StringIO
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def rendered(self, event: str) -> list[dict[str, Any]]:
        """The JSON lines of ``event`` as written to the output."""
        lines = [json.loads(line) for line in self.stream.getvalue().splitlines() if line]
        return [line for line in lines if line.get("event") == event]

    def named(self, event: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e.get("event") == event]

    def assert_never_shows(self, secrets: list[str]) -> None:
        """Neither the rendered output nor the events as logged (before redaction) hold any."""
        text = self.stream.getvalue()
        with self.lock:
            raw = repr(self.events)
        for secret in secrets:
            assert secret not in text
            assert secret not in raw


@pytest.fixture
def logs() -> Iterator[Logs]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    library_levels = {name: logging.getLogger(name).level for name in log.LIBRARY_LOGGERS}
    captured = Logs(io.StringIO())
    log.configure(format="json", level="debug", stream=captured.stream)
    added = [h for h in root.handlers if h not in handlers]  # configure's handler, only

    def record(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        with captured.lock:
            captured.events.append(dict(event_dict))
        return event_dict

    structlog.configure(processors=[record, *structlog.get_config()["processors"]])
    try:
        yield captured
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
        for name, library_level in library_levels.items():
            logging.getLogger(name).setLevel(library_level)
        structlog.reset_defaults()


@pytest.fixture
def make_store(vault: VaultFixture) -> Iterator[MakeStore]:
    made: list[VaultStore] = []

    def make(**options: Any) -> VaultStore:
        options.setdefault("address", vault.address)
        options.setdefault("mount", vault.mount)
        store = VaultStore(**options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def rw_policy(vault: VaultFixture) -> str:
    name = f"{vault.mount}-lifecycle"
    vault.client().sys.create_or_update_policy(
        name=name,
        policy=f'path "{vault.mount}/data/*" {{ capabilities = ["create", "read", "update"] }}',
    )
    return name


def short_token(vault: VaultFixture, **options: Any) -> str:
    """A token with read/write on the test's mount; ``options`` as for ``token create``."""
    created = vault.client().auth.token.create(policies=[rw_policy(vault)], **options)
    token: str = created["auth"]["client_token"]
    return token


def token_gone(vault: VaultFixture, token: str) -> bool:
    """Whether Vault no longer knows ``token`` (expired and revoked, or never existed)."""
    try:
        vault.client().auth.token.lookup(token)
    except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
        return True
    return False


def current_token(store: VaultStore) -> str:
    """The token the store sends now (a private attribute: only the test needs to see it)."""
    token = store._token
    assert token is not None
    return token.reveal()


def until(condition: Callable[[], bool], *, timeout: float, step: Callable[[], None]) -> None:
    """Run ``step`` every POLL seconds until ``condition`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        step()
        time.sleep(POLL)  # polling interval of a deadline-bounded wait


def use(store: VaultStore, path: str = "team/app") -> None:
    """One write and one read through the store, checked."""
    key_id = f"AKIA{uuid.uuid4().hex[:16].upper()}"
    key = model.NewKey(key_id, model.Secret(f"secret-{uuid.uuid4().hex}"), datetime.now(UTC))
    store.write_published(path, key, store.read_published(path))
    assert store.read_published(path).access_key_id == key_id


def chain_text(exc: BaseException) -> str:
    parts: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        parts += [str(current), repr(current)]
        todo += [current.__cause__, current.__context__]
    return "\n".join(parts)


class SecretSource:
    """A secret file's stand-in: returns its current value and counts the reads."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.reads: list[str] = []

    def __call__(self) -> model.Secret:
        self.reads.append(self.value)
        return model.Secret(self.value)


# --- static tokens ------------------------------------------------------------------------------


def test_a_renewable_token_is_renewed_before_it_expires_and_outlives_its_ttl(
    vault: VaultFixture, make_store: MakeStore, logs: Logs
) -> None:
    token = short_token(vault, ttl="3s", explicit_max_ttl="60s")
    control = short_token(vault, ttl="3s", explicit_max_ttl="60s")  # never refreshed
    store = make_store(auth=TokenAuth(model.Secret(token)))
    started = time.monotonic()

    def step() -> None:
        store.refresh_token(period=0.5)
        use(store)

    # twice the TTL, and long enough that the token nobody renews is gone
    until(
        lambda: time.monotonic() - started > 6.5 and token_gone(vault, control),
        timeout=20,
        step=step,
    )

    use(store)
    assert not token_gone(vault, token)
    ttl = store.token_ttl()
    assert ttl is not None and ttl > 0
    renewed = logs.named("vault_token_renewed")
    assert len(renewed) >= 2
    # renewed before it expired: with at most max(3/2, 2*0.5) = 1.5 s left, back to 3 s
    assert all(0 < e["previous_ttl"] <= 1.5 for e in renewed)
    assert all(e["ttl"] == 3 and e["max_ttl_reached"] is False for e in renewed)
    assert [e["logger"] for e in logs.rendered("vault_token_renewed")] == ["rotator.vault"] * len(
        renewed
    )
    logs.assert_never_shows([token, control])


def test_a_static_token_at_its_max_ttl_is_denied_with_the_fix_and_a_new_token_file_is_taken(
    vault: VaultFixture, make_store: MakeStore, logs: Logs, tmp_path: Path
) -> None:
    token = short_token(vault, ttl="2s", explicit_max_ttl="4s")
    token_file = tmp_path / "vault-token"
    token_file.write_text(token + "\n")
    store = make_store(
        auth=TokenAuth(lambda: config.read_secret_file(token_file, "vault.auth.token_file"))
    )
    denied: list[errors.VaultDenied] = []

    def step() -> None:
        try:
            store.refresh_token(period=0.5)
        except errors.VaultDenied as exc:
            denied.append(exc)
        else:
            use(store)

    until(lambda: bool(denied), timeout=10, step=step)

    message = str(denied[0])
    assert "expires in" in message
    assert "max TTL" in message
    assert "vault.auth.token_file" in message
    assert "VAULT_TOKEN" in message
    assert logs.named("vault_token_renewed")  # it was renewed while it could be

    # the operator writes a new token into the file: taken without a restart
    new_token = short_token(vault, ttl="60s")
    token_file.write_text(new_token + "\n")
    store.refresh_token(period=0.5)
    use(store)
    assert current_token(store) == new_token
    assert [e["reason"] for e in logs.named("vault_token_reloaded")] == ["token source changed"]
    assert token not in chain_text(denied[0])
    logs.assert_never_shows([token, new_token])


@pytest.mark.parametrize("fix", ["", "restart rotator (systemctl restart rotator)"])
def test_an_expired_static_token_is_denied_as_expired_naming_the_fix(
    vault: VaultFixture, make_store: MakeStore, logs: Logs, fix: str
) -> None:
    token = short_token(vault, ttl="1s")
    store = make_store(auth=TokenAuth(model.Secret(token), fix=fix))
    until(lambda: token_gone(vault, token), timeout=10, step=lambda: None)

    with pytest.raises(errors.VaultDenied) as refreshed:
        store.refresh_token()
    with pytest.raises(errors.VaultDenied) as called:
        store.read_published("team/app")

    for exc in (refreshed.value, called.value):
        message = str(exc)
        assert "expired" in message
        if fix:  # the way the token came (config.vault_token_fix)
            assert fix in message and "without a restart" not in message
        else:
            assert "vault.auth.token_file (re-read without a restart)" in message
            assert "VAULT_TOKEN" in message
        assert token not in chain_text(exc)
    logs.assert_never_shows([token])


def test_a_static_token_that_cannot_be_renewed_is_denied_only_when_it_is_close_to_expiry(
    vault: VaultFixture, make_store: MakeStore, logs: Logs
) -> None:
    token = short_token(vault, ttl="60s", renewable=False)
    store = make_store(auth=TokenAuth(model.Secret(token)))

    store.refresh_token(period=1)  # 59 s left, threshold max(30, 2): nothing to do yet
    with pytest.raises(errors.VaultDenied) as denied:
        store.refresh_token(period=30)  # threshold max(30, 60): it expires before it is safe

    assert "not renewable" in str(denied.value)
    assert "vault.auth.token_file" in str(denied.value)
    assert not logs.named("vault_token_renewed")
    assert token not in chain_text(denied.value)
    logs.assert_never_shows([token])


def test_a_renewable_token_shorter_than_the_refresh_period_is_renewed_for_longer(
    vault: VaultFixture, make_store: MakeStore, logs: Logs
) -> None:
    # renewed by its own 12 s TTL, it died before the next refresh 15 s later
    token = short_token(vault, ttl="4s", explicit_max_ttl="1h", renewable=True)
    store = make_store(auth=TokenAuth(model.Secret(token)))
    store.refresh_token(period=5)

    renewed = logs.named("vault_token_renewed")
    assert [e["asked"] for e in renewed] == [15] and renewed[0]["ttl"] >= 14
    assert renewed[0]["max_ttl_reached"] is False
    logs.assert_never_shows([token])


def test_a_token_that_never_expires_is_left_alone(
    vault: VaultFixture, make_store: MakeStore, logs: Logs
) -> None:
    store = make_store(auth=TokenAuth(model.Secret(vault.root_token)))

    store.refresh_token(period=0.001)

    assert store.token_ttl() is None
    assert not [e for e in logs.events if str(e.get("event", "")).startswith("vault_")]


# --- AppRole -----------------------------------------------------------------------------------


@dataclass
class AppRole:
    vault: VaultFixture
    mount: str
    role: str
    role_id: str

    def new_secret_id(self) -> str:
        answer = self.vault.client().auth.approle.generate_secret_id(
            role_name=self.role, mount_point=self.mount
        )
        secret_id: str = answer["data"]["secret_id"]
        return secret_id

    def destroy(self, secret_id: str) -> None:
        self.vault.client().auth.approle.destroy_secret_id(
            role_name=self.role, secret_id=secret_id, mount_point=self.mount
        )


@pytest.fixture
def approle(vault: VaultFixture) -> AppRole:
    """AppRole at a mount of this test; its tokens live 2 s, renewable up to 4 s."""
    root = vault.client()
    mount = f"approle-{vault.mount}"
    root.sys.enable_auth_method(method_type="approle", path=mount)
    root.auth.approle.create_or_update_approle(
        role_name="rotator",
        token_policies=[rw_policy(vault)],
        token_ttl="2s",
        token_max_ttl="4s",
        mount_point=mount,
    )
    role_id = root.auth.approle.read_role_id(role_name="rotator", mount_point=mount)
    return AppRole(vault, mount, "rotator", role_id["data"]["role_id"])


def test_approle_is_renewed_then_logs_in_again_at_max_ttl_with_the_current_secret_id(
    vault: VaultFixture, make_store: MakeStore, logs: Logs, approle: AppRole
) -> None:
    source = SecretSource(approle.new_secret_id())
    store = make_store(auth=AppRoleAuth(approle.role_id, source, mount=approle.mount))
    store.check()
    first = current_token(store)
    # the secret id is rotated: the old one no longer logs in, the source gives the new one
    old_secret_id = source.value
    source.value = approle.new_secret_id()
    approle.destroy(old_secret_id)
    tokens = [first]

    def step() -> None:
        store.refresh_token(period=1)
        use(store)
        if current_token(store) != tokens[-1]:
            tokens.append(current_token(store))

    # past the first token's max TTL and through two logins after it
    until(lambda: token_gone(vault, first) and len(tokens) >= 3, timeout=20, step=step)

    use(store)
    assert len(set(tokens)) == len(tokens)
    assert source.reads == [old_secret_id] + [source.value] * (len(tokens) - 1)
    relogins = logs.named("vault_relogin")
    assert len(relogins) == len(tokens) - 1
    # each new login came from refresh_token before the token expired, none after a 403
    assert {e["reason"] for e in relogins} == {"max TTL reached"}
    assert all(e["method"] == "AppRole" and e["ttl"] == 2 for e in relogins)
    assert [e["reason"] for e in logs.named("vault_login")] == ["first use"]
    assert any(e["max_ttl_reached"] is False for e in logs.named("vault_token_renewed"))
    logs.assert_never_shows([*tokens, old_secret_id, source.value])


def test_approle_token_expired_between_refreshes_is_replaced_on_the_next_call(
    vault: VaultFixture, make_store: MakeStore, logs: Logs, approle: AppRole
) -> None:
    source = SecretSource(approle.new_secret_id())
    store = make_store(auth=AppRoleAuth(approle.role_id, source, mount=approle.mount))
    use(store)
    first = current_token(store)
    until(lambda: token_gone(vault, first), timeout=10, step=lambda: None)

    use(store)
    store.refresh_token()

    assert current_token(store) != first
    reasons = [e["reason"] for e in logs.named("vault_relogin")]
    # then, its tokens living less than three refresh periods, the refresh logs in afresh
    assert reasons[0] == "token rejected" and set(reasons[1:]) <= {"max TTL reached"}
    logs.assert_never_shows([first, current_token(store), source.value])


def test_a_policy_denial_with_a_valid_approle_token_makes_no_new_login(
    vault: VaultFixture, make_store: MakeStore, logs: Logs, approle: AppRole
) -> None:
    # a new login per denied call used up a secret id's uses and left tokens behind; the error
    # then turned into a refused login, hiding the missing grant
    source = SecretSource(approle.new_secret_id())
    store = make_store(auth=AppRoleAuth(approle.role_id, source, mount=approle.mount))
    use(store)
    for _ in range(3):
        with pytest.raises(errors.VaultDenied) as denied:
            store.list_states()  # the role's policy grants no `list`
        assert "denied `list`" in str(denied.value)

    assert source.reads == [source.value]  # one login, the first
    assert logs.named("vault_relogin") == []


def test_a_refused_approle_login_is_not_sent_again_until_the_secret_id_changes(
    vault: VaultFixture,
    make_store: MakeStore,
    logs: Logs,
    approle: AppRole,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OpenBao locks a role out for 15 min after 5 refused logins: a good secret id written
    # then would be refused too. Every call and readiness check logged in again.
    used_up = approle.new_secret_id()
    approle.destroy(used_up)
    source = SecretSource(used_up)
    store = make_store(auth=AppRoleAuth(approle.role_id, source, mount=approle.mount))
    sent: list[str] = []
    real = vault_adapter._login_request

    def counted(client: Any, auth: Any, credential: model.Secret) -> Any:
        sent.append(credential.reveal())
        return real(client, auth, credential)

    monkeypatch.setattr(vault_adapter, "_login_request", counted)
    messages = []
    for _ in range(6):
        with pytest.raises(errors.VaultDenied) as refused:
            store.check()
        messages.append(str(refused.value))

    assert sent == [used_up]  # sent once, held since
    assert "was refused" in messages[0] and "not tried again" in messages[-1]
    source.value = approle.new_secret_id()  # the operator writes a new one: tried at once
    store.check()
    use(store)
    assert sent == [used_up, source.value]
    logs.assert_never_shows([used_up, source.value, current_token(store)])


def test_refresh_from_another_thread_while_calls_run_never_breaks_a_call(
    vault: VaultFixture, make_store: MakeStore, logs: Logs, approle: AppRole
) -> None:
    store = make_store(
        auth=AppRoleAuth(approle.role_id, model.Secret(approle.new_secret_id()), approle.mount)
    )
    stop = threading.Event()
    failures: list[BaseException] = []
    calls = [0] * 4

    def worker(number: int) -> None:
        while not stop.is_set():
            try:
                use(store, f"team/worker-{number}")
            except BaseException as exc:
                failures.append(exc)
                return
            calls[number] += 1

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(len(calls))]
    for thread in workers:
        thread.start()
    try:
        until(
            lambda: len(logs.named("vault_relogin")) >= 2 or bool(failures),
            timeout=20,
            step=lambda: store.refresh_token(period=1),
        )
    finally:
        stop.set()
        for thread in workers:
            thread.join(timeout=10)

    assert not any(thread.is_alive() for thread in workers)
    assert failures == []
    assert all(count > 10 for count in calls)
    assert {e["reason"] for e in logs.named("vault_relogin")} == {"max TTL reached"}


# --- Kubernetes --------------------------------------------------------------------------------


@dataclass
class Kubernetes:
    stand_in: TokenReviewStandIn
    mount: str
    token_file: Path

    def auth(self) -> KubernetesAuth:
        path = self.token_file
        return KubernetesAuth(
            role="rotator",
            jwt=lambda: config.read_secret_file(path, "vault.auth.kubernetes.token_file"),
            mount=self.mount,
        )

    def mount_jwt(self, jwt: str) -> None:
        """What the kubelet does when it rotates the projected service account token."""
        self.token_file.write_text(jwt)


@pytest.fixture
def kubernetes(vault: VaultFixture, tmp_path: Path) -> Iterator[Kubernetes]:
    """Kubernetes auth backed by the TokenReview stand-in; tokens live 2 s, up to 4 s."""
    account = ServiceAccount("ops", "rotator", str(uuid.uuid4()))
    mount = f"kubernetes-{vault.mount}"
    root = vault.client()
    with TokenReviewStandIn(account) as stand_in:
        kubernetes_standin.enable_auth(
            root,
            mount,
            stand_in,
            token_policies=[rw_policy(vault)],
            token_ttl="2s",
            token_max_ttl="4s",
        )
        yield Kubernetes(stand_in, mount, tmp_path / "serviceaccount-token")


def test_kubernetes_logs_in_again_at_max_ttl_with_the_rotated_service_account_token(
    vault: VaultFixture, make_store: MakeStore, logs: Logs, kubernetes: Kubernetes
) -> None:
    account = kubernetes.stand_in.account
    first_jwt, second_jwt = account.jwt(), account.jwt()
    kubernetes.stand_in.accept(first_jwt)
    kubernetes.mount_jwt(first_jwt)
    store = make_store(auth=kubernetes.auth())
    use(store)
    first = current_token(store)
    assert kubernetes.stand_in.reviews() == [first_jwt]
    # the kubelet rotates the token file (the old token stays valid until it expires)
    kubernetes.stand_in.accept(second_jwt)
    kubernetes.mount_jwt(second_jwt)

    def step() -> None:
        store.refresh_token(period=1)
        use(store)

    until(
        lambda: token_gone(vault, first) and len(logs.named("vault_relogin")) >= 2,
        timeout=20,
        step=step,
    )

    use(store)
    reviews = kubernetes.stand_in.reviews()
    # OpenBao reviews the login's JWT again on each renewal: the new one only after a new login
    assert reviews[0] == first_jwt
    assert second_jwt in reviews and reviews[-1] == second_jwt
    relogins = logs.named("vault_relogin")
    assert {e["reason"] for e in relogins} == {"max TTL reached"}
    assert all(e["method"] == "Kubernetes" and e["mount"] == kubernetes.mount for e in relogins)
    assert current_token(store) != first
    logs.assert_never_shows([first, current_token(store), first_jwt, second_jwt])


def test_kubernetes_renewal_refused_for_a_revoked_service_account_token_logs_in_again(
    make_store: MakeStore, logs: Logs, kubernetes: Kubernetes
) -> None:
    account = kubernetes.stand_in.account
    first_jwt, second_jwt = account.jwt(), account.jwt()
    kubernetes.stand_in.accept(first_jwt, second_jwt)
    kubernetes.mount_jwt(first_jwt)
    store = make_store(auth=kubernetes.auth())
    use(store)
    first = current_token(store)
    # the old service account token is revoked and a new one mounted: OpenBao's renewal reviews
    # the old one again and refuses, so the refused renewal makes rotator log in with the new one
    kubernetes.mount_jwt(second_jwt)
    kubernetes.stand_in.revoke(first_jwt)

    store.refresh_token(period=1)  # 2 s left, threshold max(1, 2): renew
    use(store)

    assert current_token(store) != first
    # the token itself is still valid (lookup-self): the refused renewal leads to one login
    assert kubernetes.stand_in.reviews() == [first_jwt, first_jwt, second_jwt]
    assert [e["reason"] for e in logs.named("vault_relogin")] == ["renewal refused"]
    assert logs.named("vault_token_renewed") == []  # the fresh login has a full TTL
    logs.assert_never_shows([first, current_token(store), first_jwt, second_jwt])


def test_kubernetes_relogin_with_a_token_the_api_rejects_is_denied_clearly(
    vault: VaultFixture, make_store: MakeStore, logs: Logs, kubernetes: Kubernetes
) -> None:
    account = kubernetes.stand_in.account
    good_jwt, rejected_jwt = account.jwt(), account.jwt()
    kubernetes.stand_in.accept(good_jwt)
    kubernetes.mount_jwt(good_jwt)
    store = make_store(auth=kubernetes.auth())
    use(store)
    first = current_token(store)
    kubernetes.mount_jwt(rejected_jwt)
    denied: list[errors.VaultDenied] = []

    def refresh() -> None:
        try:
            store.refresh_token(period=1)
        except errors.VaultDenied as exc:
            denied.append(exc)

    until(lambda: bool(denied), timeout=10, step=refresh)
    # once the old token is gone, every call says the same
    until(lambda: token_gone(vault, first), timeout=10, step=lambda: None)
    with pytest.raises(errors.VaultDenied) as called:
        store.read_published("team/app")

    for exc in (denied[0], called.value):
        message = str(exc)
        assert f"Kubernetes login at auth/{kubernetes.mount}/login on {vault.address}" in message
        assert "was refused" in message
        assert "service account" in message
        text = chain_text(exc)
        for secret in (first, good_jwt, rejected_jwt):
            assert secret not in text
    assert rejected_jwt in kubernetes.stand_in.reviews()  # the file was re-read
    logs.assert_never_shows([first, good_jwt, rejected_jwt])
