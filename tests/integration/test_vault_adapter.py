"""VaultStore against a real OpenBao: the KV v2 layout, check-and-set, error translation, locks."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import hvac
import pytest
import structlog.testing

from rotator import errors, model
from rotator.adapters import vault as vault_adapter
from rotator.adapters.vault import AppRoleAuth, KubernetesAuth, TokenAuth, VaultStore
from tests.support import kubernetes_standin, servers
from tests.support.kubernetes_standin import ServiceAccount, TokenReviewStandIn
from tests.support.openbao import VaultFixture

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")

MakeStore = Callable[..., VaultStore]


class FakeClock:
    def __init__(self) -> None:
        self.value = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += timedelta(seconds=seconds)


@pytest.fixture
def make_store(vault: VaultFixture) -> Iterator[MakeStore]:
    """Build VaultStores on the test's mount (root token unless told); closed after the test."""
    made: list[VaultStore] = []

    def make(**options: Any) -> VaultStore:
        options.setdefault("address", vault.address)
        options.setdefault("auth", TokenAuth(model.Secret(vault.root_token)))
        options.setdefault("mount", vault.mount)
        store = VaultStore(**options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: MakeStore) -> VaultStore:
    return make_store()


def new_key(key_id: str = "AKIAEXAMPLE0001", created: datetime | None = None) -> model.NewKey:
    return model.NewKey(
        key_id=key_id,
        secret=model.Secret(f"secret-{uuid.uuid4().hex}"),
        created=created or datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC),
    )


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


# --- published secret --------------------------------------------------------------------------


def test_published_round_trip_puts_the_secret_in_secret_access_key_and_created_at_in_utc(
    store: VaultStore, vault: VaultFixture
) -> None:
    paris = timezone(timedelta(hours=2))
    key = new_key(created=datetime(2030, 6, 1, 14, 30, 5, tzinfo=paris))

    written = store.write_published("team/app", key, store.read_published("team/app"))
    raw = vault.read_raw("team/app")
    read = store.read_published("team/app")

    assert raw is not None
    assert raw["secret_access_key"] == key.secret.reveal()
    assert raw["access_key_id"] == key.key_id
    assert RFC3339_UTC.match(raw["created_at"]), raw["created_at"]
    assert model.parse_time(raw["created_at"]) == key.created
    assert raw["created_at"].startswith("2030-06-01T12:30:05")
    assert written == read
    assert read.access_key_id == key.key_id
    assert read.created_at == key.created
    assert read.created_at is not None
    assert read.created_at.tzinfo == UTC
    assert read.version == 1
    assert read.extra == {}
    assert key.secret.reveal() not in repr(read)


@pytest.mark.parametrize(("offset", "said"), [(30.0, "30 s ahead of"), (-30.0, "30 s behind")])
def test_a_host_clock_off_vaults_is_warned_of_once(
    store: VaultStore, monkeypatch: pytest.MonkeyPatch, offset: float, said: str
) -> None:
    # replicas judge each other's leases by their own clocks: a replica 20 s ahead took every
    # lease of the other mid-rotation, and only `lock_lost` "(Vault slow?)" was said (c11)
    with structlog.testing.capture_logs() as logs:
        store.write_published("team/app", new_key(), store.read_published("team/app"))  # in time
        monkeypatch.setattr(vault_adapter, "_wall_clock", lambda: time.time() + offset)
        for _ in range(2):
            store.write_published("team/app", new_key(), store.read_published("team/app"))

    [skew] = [e for e in logs if e["event"] == "clock_skew"]
    assert skew["log_level"] == "warning" and said in skew["note"]
    assert abs(skew["skew_seconds"] - offset) < 3 and "NTP" in skew["note"]


def test_the_published_secret_is_read_back_only_when_complete(
    store: VaultStore, vault: VaultFixture
) -> None:
    key = new_key()
    store.write_published("team/app", key, store.read_published("team/app"))
    vault.client().secrets.kv.v2.create_or_update_secret(
        path="team/partial",
        secret={"access_key_id": "AKIAPARTIAL", "secret_access_key": ""},
        mount_point=vault.mount,
    )

    found = store.read_published_secret("team/app")

    assert found is not None
    assert found[0] == key.key_id and found[1].reveal() == key.secret.reveal()
    assert key.secret.reveal() not in repr(found)
    assert store.read_published_secret("team/partial") is None
    assert store.read_published_secret("team/absent") is None
    # what a pass sees of them: the secret's digest, or that it is missing; never the secret
    app, partial = store.read_published("team/app"), store.read_published("team/partial")
    assert app.secret_digest == model.secret_digest(key.secret.reveal())
    assert not app.secret_missing and partial.secret_missing and partial.secret_digest is None
    assert not store.read_published("team/absent").secret_missing


def test_fields_another_writer_put_there_are_kept_on_read_and_write(
    store: VaultStore, vault: VaultFixture
) -> None:
    vault.client().secrets.kv.v2.create_or_update_secret(
        path="team/app",
        mount_point=vault.mount,
        secret={"region": "eu-west-2", "access_key_id": "OLDKEY", "owner": {"team": "ops"}},
    )
    base = store.read_published("team/app")
    store.write_published("team/app", new_key("NEWKEY"), base)

    assert base.access_key_id == "OLDKEY"
    assert base.extra == {"region": "eu-west-2", "owner": {"team": "ops"}}
    raw = vault.read_raw("team/app")
    assert raw is not None
    assert raw["region"] == "eu-west-2"
    assert raw["owner"] == {"team": "ops"}
    assert raw["access_key_id"] == "NEWKEY"
    assert store.read_published("team/app").extra == base.extra


def test_publishing_over_a_stale_version_conflicts_and_overwrites_nothing(
    store: VaultStore, vault: VaultFixture
) -> None:
    base = store.read_published("team/app")
    store.write_published("team/app", new_key("FIRST"), base)
    # someone else writes after our read
    stale = store.read_published("team/app")
    vault.client().secrets.kv.v2.create_or_update_secret(
        path="team/app", mount_point=vault.mount, secret={"access_key_id": "BYHAND"}
    )

    with pytest.raises(errors.VaultConflict) as first:
        store.write_published("team/app", new_key("SECOND"), base)
    with pytest.raises(errors.VaultConflict):
        store.write_published("team/app", new_key("THIRD"), stale)

    assert first.value.transient
    assert f"{vault.mount}/data/team/app" in str(first.value)
    assert vault.read_raw("team/app") == {"access_key_id": "BYHAND"}
    assert store.read_published("team/app").version == 2


def test_absent_paths_read_as_version_zero(store: VaultStore) -> None:
    assert store.read_published("nobody/here") == model.Published(None, None, {}, version=0)
    assert store.read_state("nobody") == model.StoredState(model.TargetState(), 0)
    assert store.holder("nobody") is None


def test_a_soft_deleted_secret_reads_empty_with_its_version_so_check_and_set_still_works(
    store: VaultStore, vault: VaultFixture
) -> None:
    store.write_published("team/app", new_key("FIRST"), store.read_published("team/app"))
    vault.client().secrets.kv.v2.delete_latest_version_of_secret(
        path="team/app", mount_point=vault.mount
    )

    deleted = store.read_published("team/app")
    written = store.write_published("team/app", new_key("SECOND"), deleted)

    assert deleted == model.Published(None, None, {}, version=1)
    assert written.version == 2
    assert store.read_published("team/app").access_key_id == "SECOND"


def test_a_destroyed_secret_reads_empty_with_its_version(
    store: VaultStore, vault: VaultFixture
) -> None:
    store.write_published("team/app", new_key("FIRST"), store.read_published("team/app"))
    vault.client().secrets.kv.v2.destroy_secret_versions(
        path="team/app", versions=[1], mount_point=vault.mount
    )

    assert store.read_published("team/app") == model.Published(None, None, {}, version=1)


# --- rotator state -------------------------------------------------------------------------------


def full_state() -> model.TargetState:
    t = datetime(2030, 1, 1, 12, 0, 0, 250000, tzinfo=UTC)
    return model.TargetState(
        current=model.CurrentKey("AKIACURRENT", t, t + timedelta(seconds=5), t + timedelta(1)),
        retiring=(
            model.RetiringKey("AKIAOLD1", t + timedelta(days=1)),
            model.RetiringKey(
                "AKIAOLD2",
                t,
                deactivated_at=t,
                delete_at=t + timedelta(days=3),
                since=t - timedelta(days=1),
            ),
            model.RetiringKey(
                "AKIAORPHAN", t, deactivated_at=t, delete_at=t + timedelta(minutes=10), orphan=True
            ),
        ),
        pending=model.PendingKey(
            "AKIAPENDING",
            model.Secret(f"pending-secret-{uuid.uuid4().hex}"),
            t,
            attempts=2,
            last_attempt_at=t + timedelta(seconds=30),
            replaces="AKIACURRENT",
            made_at=t + timedelta(seconds=1),
            uncounted=True,
        ),
        intent=model.Intent(t - timedelta(seconds=1)),
        created_ids=("AKIAOLD2", "AKIAOLD1", "AKIACURRENT", "AKIAPENDING"),
        identity_digest="sha256:abc",
        identity_checked_at=t,
        last_success_at=t,
        last_rotation_at=t - timedelta(days=1),
        last_error="EIM throttled",
        last_error_at=t - timedelta(hours=1),
        next_due_at=t + timedelta(days=30),
        failures=3,
        retry_after=t + timedelta(minutes=5),
        user="watcher_1",
        secret_path="monitoring/watcher_1",
        renamed_to="monitor2",
        restore_tried="monitoring/watcher_1@7",
        account="123456789012",
    )


def test_list_states_names_the_targets_that_have_a_state_and_nothing_else(
    store: VaultStore,
) -> None:
    assert store.list_states() == []  # nothing written yet: no error either
    store.write_state("monitoring", model.TargetState(user="watcher_1"), 0)
    store.write_state("fleet-01", model.TargetState(user="user-fleet-01"), 0)
    store.write_published("rotator-not-a-state", new_key(), model.Published(None, None))
    store.acquire("monitoring", "holder-a", 10)  # a lock is not a state

    assert store.list_states() == ["fleet-01", "monitoring"]


def test_state_round_trip_preserves_every_field_including_the_pending_secret(
    store: VaultStore, vault: VaultFixture
) -> None:
    state = full_state()
    # guard: a field added to TargetState later must be set here too, or this test proves less
    for f in dataclasses.fields(model.TargetState):
        assert getattr(state, f.name) != f.default, f"full_state() leaves {f.name} at its default"

    version = store.write_state("web", state, 0)
    read = store.read_state("web")

    assert version == 1
    assert read == model.StoredState(state, 1)
    assert read.state.pending is not None
    assert state.pending is not None
    assert read.state.pending.secret.reveal() == state.pending.secret.reveal()
    raw = vault.read_raw("rotator/targets/web")
    assert raw is not None
    assert raw["schema"] == model.STATE_SCHEMA
    assert store.write_state("web", state.replace(failures=0), 1) == 2


def test_state_written_over_a_stale_version_conflicts(store: VaultStore) -> None:
    store.write_state("web", model.TargetState(failures=1), 0)
    store.write_state("web", model.TargetState(failures=2), 1)

    with pytest.raises(errors.VaultConflict):
        store.write_state("web", model.TargetState(failures=9), 1)
    with pytest.raises(errors.VaultConflict):
        store.write_state("web", model.TargetState(failures=9), 0)

    assert store.read_state("web") == model.StoredState(model.TargetState(failures=2), 2)


def test_state_with_an_unknown_schema_raises_instead_of_reading_as_empty(
    store: VaultStore, vault: VaultFixture
) -> None:
    vault.client().secrets.kv.v2.create_or_update_secret(
        path="rotator/targets/web", mount_point=vault.mount, secret={"schema": 99, "current": None}
    )

    with pytest.raises(errors.StateSchemaError):
        store.read_state("web")


@pytest.mark.parametrize("how", ["delete", "destroy"])
def test_a_state_whose_latest_version_was_deleted_is_an_error_naming_the_undelete_not_no_state(
    how: str, store: VaultStore, vault: VaultFixture
) -> None:
    # Vault's delete_version_after does this on its own: taken for "no state", the keys the
    # state tracks would count as foreign and the retiring ones never be retired.
    store.write_state("web", full_state(), 0)
    kv = vault.client().secrets.kv.v2
    if how == "delete":
        kv.delete_latest_version_of_secret(path="rotator/targets/web", mount_point=vault.mount)
    else:
        kv.destroy_secret_versions(
            path="rotator/targets/web", versions=[1], mount_point=vault.mount
        )

    with pytest.raises(errors.StateDeleted) as deleted:
        store.read_state("web")

    message = str(deleted.value)
    assert "latest version (1) of the state of target web" in message
    assert "delete_version_after" in message and "kv undelete" in message
    assert "kv metadata delete" in message  # the deliberate way to start over
    assert "pending-secret" not in message


def test_mount_settings_that_work_against_rotator_are_warned_of_and_a_denied_read_skips(
    store: VaultStore, make_store: MakeStore, vault: VaultFixture
) -> None:
    assert store.setup_warnings() == []  # the dev server's defaults
    kv = vault.client().secrets.kv.v2
    kv.configure(mount_point=vault.mount, delete_version_after="1h30m0s", max_versions=1)
    token = vault.token_with_policy(
        f"{vault.mount}-no-config", f'path "{vault.mount}/data/*" {{ capabilities = ["read"] }}'
    )
    try:
        warned = store.setup_warnings()
        denied = make_store(auth=TokenAuth(model.Secret(token))).setup_warnings()
    finally:
        kv.configure(mount_point=vault.mount, delete_version_after="0s", max_versions=0)

    assert len(warned) == 2
    assert f"the mount {vault.mount}/ deletes every version 5400s after it is written" in warned[0]
    assert "delete_version_after=0s" in warned[0]
    assert "max_versions 1" in warned[1] and "roll-back" in warned[1]
    assert denied == []  # not granted: the check is skipped


def test_an_earlier_version_of_the_published_secret_is_read_by_number(
    store: VaultStore, vault: VaultFixture
) -> None:
    first, second = new_key("AKIAEXAMPLE0001"), new_key("AKIAEXAMPLE0002")
    base = store.write_published("team/app", first, store.read_published("team/app"))
    store.write_published("team/app", second, base)
    vault.client().secrets.kv.v2.delete_secret_versions(
        path="team/app", versions=[2], mount_point=vault.mount
    )

    assert store.read_published_secret("team/app", 1) == (first.key_id, first.secret)
    assert store.read_published_secret("team/app", 2) is None  # deleted
    assert store.read_published_secret("team/app") is None  # the latest is the deleted one
    assert store.read_published_secret("team/app", 7) is None  # never written


def test_a_path_whose_versions_vault_deletes_is_warned_of_once_on_its_first_write(
    store: VaultStore, vault: VaultFixture
) -> None:
    # delete_version_after on one path, not the mount: setup_warnings() cannot see it, and the
    # published secret would vanish, a new key made each time (the state: refused as deleted)
    kv = vault.client().secrets.kv.v2
    for path in ("team/expiring", "rotator/targets/web"):
        kv.update_metadata(path=path, delete_version_after="1h", mount_point=vault.mount)
    with structlog.testing.capture_logs() as logs:
        base = store.write_published("team/expiring", new_key(), store.read_published("x/y"))
        store.write_published("team/expiring", new_key("AKIAEXAMPLE0002"), base)
        store.write_state("web", model.TargetState(failures=1), 0)
        store.write_published("team/lasting", new_key(), store.read_published("team/lasting"))

    warned = [e for e in logs if e["event"] == "vault_version_expires"]
    assert [e["path"] for e in warned] == [
        f"{vault.mount}/data/team/expiring",
        f"{vault.mount}/data/rotator/targets/web",
    ]  # once per path, and not for a path that keeps its versions
    assert warned[0]["log_level"] == "warning" and warned[0]["deletion_time"]
    assert "consumers lose the key" in warned[0]["reason"]
    assert "refused as deleted" in warned[1]["reason"]
    assert "-delete-version-after=0s team/expiring" in warned[0]["fix"]
    assert "secret-" not in repr(warned)

    # set on the mount, setup_warnings() says it once: not again on each path's first write
    kv.configure(mount_point=vault.mount, delete_version_after="2h")
    try:
        assert len(store.setup_warnings()) == 1
        with structlog.testing.capture_logs() as logs:
            store.write_published("team/other", new_key(), store.read_published("team/other"))
    finally:
        kv.configure(mount_point=vault.mount, delete_version_after="0s")
    assert [e for e in logs if e["event"] == "vault_version_expires"] == []


def test_state_path_is_configurable(make_store: MakeStore, vault: VaultFixture) -> None:
    store = make_store(state_path="/ops/rotator/")
    store.write_state("web", model.TargetState(failures=1), 0)

    assert vault.read_raw("ops/rotator/targets/web") is not None
    assert vault.read_raw("rotator/targets/web") is None


# --- errors ------------------------------------------------------------------------------------


def test_a_read_only_token_is_denied_on_write_with_the_path_and_capability_named(
    make_store: MakeStore, vault: VaultFixture
) -> None:
    token = vault.token_with_policy(
        f"{vault.mount}-ro", f'path "{vault.mount}/data/*" {{ capabilities = ["read"] }}'
    )
    store = make_store(auth=TokenAuth(model.Secret(token)))
    key = new_key()

    base = store.read_published("team/app")  # reading is allowed
    with pytest.raises(errors.VaultDenied) as denied:
        store.write_published("team/app", key, base)

    message = str(denied.value)
    assert f"`create` on `{vault.mount}/data/team/app`" in message
    assert "rotator policy" in message
    assert not denied.value.transient
    assert token not in message
    assert key.secret.reveal() not in message
    assert vault.read_raw("team/app") is None


def test_an_invalid_token_is_denied_and_said_to_be_invalid(make_store: MakeStore) -> None:
    token = "s.thisTokenDoesNotExist0123456789"
    store = make_store(auth=TokenAuth(model.Secret(token)))

    with pytest.raises(errors.VaultDenied) as on_check:
        store.check()
    with pytest.raises(errors.VaultDenied) as on_read:
        store.read_published("team/app")

    for exc in (on_check.value, on_read.value):
        assert "rejected rotator's token" in str(exc)
        assert "VAULT_TOKEN" in str(exc)
        assert token not in str(exc)


def test_a_revoked_token_is_denied_as_invalid_not_as_a_policy_problem(
    make_store: MakeStore, vault: VaultFixture
) -> None:
    token = vault.token_with_policy(
        f"{vault.mount}-rw", f'path "{vault.mount}/data/*" {{ capabilities = ["read"] }}'
    )
    store = make_store(auth=TokenAuth(model.Secret(token)))
    store.check()
    vault.client().auth.token.revoke(token)

    with pytest.raises(errors.VaultDenied) as denied:
        store.read_published("team/app")

    assert "invalid, expired or revoked" in str(denied.value)
    assert "capabilities" not in str(denied.value)


def test_an_https_address_of_a_plain_http_vault_says_so_not_the_ca(vault: VaultFixture) -> None:
    address = vault.address.replace("http://", "https://")
    with (
        VaultStore(address=address, auth=TokenAuth(model.Secret(vault.root_token))) as store,
        pytest.raises(errors.VaultUnavailable) as unavailable,
    ):
        store.read_published("team/app")

    message = str(unavailable.value)
    assert f"Vault at {address} does not speak TLS" in message
    assert "is vault.address meant to be http://?" in message
    assert "ca_file" not in message and vault.root_token not in message


def test_an_address_nothing_listens_on_is_unavailable_quickly(vault: VaultFixture) -> None:
    address = f"http://127.0.0.1:{servers.free_port()}"
    with VaultStore(address=address, auth=TokenAuth(model.Secret(vault.root_token))) as store:
        started = time.monotonic()
        with pytest.raises(errors.VaultUnavailable) as unavailable:
            store.read_published("team/app")
        elapsed = time.monotonic() - started

    assert elapsed < 3
    assert address in str(unavailable.value)
    assert unavailable.value.transient


def test_a_sealed_vault_is_unavailable(tmp_path: Path) -> None:
    with servers.OpenBaoServer(tmp_path / "home") as sealed:
        root = hvac.Client(url=sealed.address, token=sealed.root_token, timeout=10)
        store = VaultStore(address=sealed.address, auth=TokenAuth(model.Secret(sealed.root_token)))
        try:
            store.check()  # works before the seal
            root.sys.seal()
            assert root.sys.is_sealed()
            with pytest.raises(errors.VaultUnavailable) as on_check:
                store.check()
            with pytest.raises(errors.VaultUnavailable) as on_read:
                store.read_published("team/app")
        finally:
            store.close()
            root.adapter.close()

    for exc in (on_check.value, on_read.value):
        assert "sealed" in str(exc)
        assert sealed.address in str(exc)


def test_a_mount_that_does_not_exist_is_named_with_the_fix(make_store: MakeStore) -> None:
    store = make_store(mount="no-such-mount")

    with pytest.raises(errors.VaultError) as on_read:
        store.read_published("team/app")
    with pytest.raises(errors.VaultError) as on_check:
        store.check()

    for exc in (on_read.value, on_check.value):
        assert not isinstance(exc, errors.VaultUnavailable)
        assert "no-such-mount/" in str(exc)
        assert "kv-v2" in str(exc)


def test_reads_on_a_transit_mount_say_it_is_not_kv_v2_instead_of_finding_no_secret(
    make_store: MakeStore, vault: VaultFixture
) -> None:
    # A read on a mount of another kind must not look like "no state yet": `status` showed the
    # target due for its first key. (A KV v1 mount answers a missing path as KV v2 does; its
    # first write says so, and `check` at start.)
    other = f"{vault.mount}-other"
    root = vault.client()
    root.sys.enable_secrets_engine(backend_type="transit", path=other)
    try:
        store = make_store(mount=other)
        with pytest.raises(errors.VaultError) as on_state:
            store.read_state("monitoring")
        with pytest.raises(errors.VaultError) as on_secret:
            store.read_published("team/app")
    finally:
        root.sys.disable_secrets_engine(path=other)

    for exc in (on_state.value, on_secret.value):
        assert "not KV version 2" in str(exc)
        assert f"{other}/" in str(exc)


def test_check_rejects_a_kv_version_1_mount(make_store: MakeStore, vault: VaultFixture) -> None:
    v1_mount = f"{vault.mount}-v1"
    root = vault.client()
    root.sys.enable_secrets_engine(backend_type="kv", path=v1_mount, options={"version": "1"})
    try:
        with pytest.raises(errors.VaultError) as on_check:
            make_store(mount=v1_mount).check()
    finally:
        root.sys.disable_secrets_engine(path=v1_mount)

    assert "not KV version 2" in str(on_check.value)
    assert v1_mount in str(on_check.value)


def test_check_passes_and_reports_the_token_ttl(make_store: MakeStore, vault: VaultFixture) -> None:
    token = vault.token_with_policy(
        f"{vault.mount}-ttl", f'path "{vault.mount}/data/*" {{ capabilities = ["read"] }}', ttl="1h"
    )
    root_store = make_store()
    store = make_store(auth=TokenAuth(model.Secret(token)))

    store.check()
    root_store.check()

    ttl = store.token_ttl()
    assert ttl is not None
    assert 3500 < ttl <= 3600
    assert root_store.token_ttl() is None  # the root token never expires


# --- AppRole -----------------------------------------------------------------------------------


@pytest.fixture
def approle(vault: VaultFixture) -> Callable[..., AppRoleAuth]:
    """Enable AppRole at a mount of this test and return a factory of AppRoleAuth for roles."""
    root = vault.client()
    mount = f"approle-{vault.mount}"
    root.sys.enable_auth_method(method_type="approle", path=mount)
    root.sys.create_or_update_policy(
        name=f"{vault.mount}-rotator",
        policy=f'path "{vault.mount}/data/*" {{ capabilities = ["create", "read", "update"] }}',
    )

    def make(role: str = "rotator", **role_options: Any) -> AppRoleAuth:
        root.auth.approle.create_or_update_approle(
            role_name=role,
            token_policies=[f"{vault.mount}-rotator"],
            mount_point=mount,
            **role_options,
        )
        role_id = root.auth.approle.read_role_id(role_name=role, mount_point=mount)
        secret_id = root.auth.approle.generate_secret_id(role_name=role, mount_point=mount)
        return AppRoleAuth(
            role_id=role_id["data"]["role_id"],
            secret_id=model.Secret(secret_id["data"]["secret_id"]),
            mount=mount,
        )

    return make


def test_approle_login_works_for_reads_and_writes(
    make_store: MakeStore, approle: Callable[..., AppRoleAuth]
) -> None:
    store = make_store(auth=approle())

    store.write_published("team/app", new_key("VIAAPPROLE"), store.read_published("team/app"))
    store.check()

    assert store.read_published("team/app").access_key_id == "VIAAPPROLE"
    ttl = store.token_ttl()
    assert ttl is not None
    assert ttl > 0


def test_approle_logs_in_again_when_its_token_stops_working(
    make_store: MakeStore, approle: Callable[..., AppRoleAuth]
) -> None:
    # each token is good for one request: every call after the first needs a fresh login
    store = make_store(auth=approle(token_num_uses=1))

    base = store.read_published("team/app")
    store.write_published("team/app", new_key("RELOGGED"), base)

    assert store.read_published("team/app").access_key_id == "RELOGGED"


def test_approle_with_a_wrong_secret_id_is_denied_without_echoing_it(
    make_store: MakeStore, approle: Callable[..., AppRoleAuth]
) -> None:
    good = approle()
    wrong = model.Secret(str(uuid.uuid4()))
    store = make_store(auth=AppRoleAuth(good.role_id, wrong, mount=good.mount))

    with pytest.raises(errors.VaultDenied) as denied:
        store.read_published("team/app")

    assert "AppRole login" in str(denied.value)
    assert "secret_id" in str(denied.value)
    for exc in exception_chain(denied.value):
        assert wrong.reveal() not in str(exc)
        assert wrong.reveal() not in repr(exc)


# --- Kubernetes --------------------------------------------------------------------------------


# Never used to verify anything (the stand-in API server below is plain HTTP), but the auth
# method insists on a CA certificate when it does not run in a pod. Public half of a throwaway.
@pytest.fixture
def kubernetes(vault: VaultFixture) -> Iterator[tuple[KubernetesAuth, TokenReviewStandIn]]:
    """Kubernetes auth enabled at a mount of this test, backed by the TokenReview stand-in."""
    account = ServiceAccount("ops", "rotator", str(uuid.uuid4()))
    jwt = account.jwt()
    mount = f"kubernetes-{vault.mount}"
    root = vault.client()
    with TokenReviewStandIn(account) as stand_in:
        stand_in.accept(jwt)
        root.sys.create_or_update_policy(
            name=f"{vault.mount}-k8s",
            policy=f'path "{vault.mount}/data/*" {{ capabilities = ["create", "read", "update"] }}',
        )
        kubernetes_standin.enable_auth(root, mount, stand_in, token_policies=[f"{vault.mount}-k8s"])
        yield KubernetesAuth(role="rotator", jwt=model.Secret(jwt), mount=mount), stand_in


def test_kubernetes_login_works_with_the_service_account_token(
    make_store: MakeStore, kubernetes: tuple[KubernetesAuth, TokenReviewStandIn]
) -> None:
    auth, stand_in = kubernetes
    store = make_store(auth=auth)

    store.write_published("team/app", new_key("VIAK8S"), store.read_published("team/app"))

    assert store.read_published("team/app").access_key_id == "VIAK8S"
    assert stand_in.reviews() == [auth.jwt.reveal()]  # one login, then the token is reused


def test_kubernetes_login_refused_is_denied_without_echoing_the_jwt(
    make_store: MakeStore, kubernetes: tuple[KubernetesAuth, TokenReviewStandIn]
) -> None:
    auth, _ = kubernetes
    other = ServiceAccount("ops", "rotator", str(uuid.uuid4())).jwt()  # not accepted
    store = make_store(
        auth=KubernetesAuth(role=auth.role, jwt=model.Secret(other), mount=auth.mount)
    )

    with pytest.raises(errors.VaultDenied) as denied:
        store.check()

    assert f"Kubernetes login at auth/{auth.mount}/login" in str(denied.value)
    for exc in exception_chain(denied.value):
        assert other not in str(exc)
        assert other not in repr(exc)


# --- locks -------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def locks(make_store: MakeStore, clock: FakeClock) -> VaultStore:
    return make_store(now=clock.now)


def test_of_two_holders_only_one_acquires(locks: VaultStore) -> None:
    assert locks.acquire("web", "replica-a", 15)
    assert not locks.acquire("web", "replica-b", 15)
    assert locks.holder("web") == "replica-a"
    assert locks.acquire("web", "replica-a", 15)  # already ours: taken again


def test_after_expiry_another_holder_takes_the_lock(locks: VaultStore, clock: FakeClock) -> None:
    assert locks.acquire("web", "replica-a", 15)
    clock.advance(14)
    assert not locks.acquire("web", "replica-b", 15)

    clock.advance(1)

    assert locks.holder("web") is None
    assert locks.acquire("web", "replica-b", 15)
    assert locks.holder("web") == "replica-b"
    assert not locks.renew("web", "replica-a", 15)


def test_renew_fails_for_a_non_holder_and_extends_the_holders_lease(
    locks: VaultStore, clock: FakeClock
) -> None:
    assert locks.acquire("web", "replica-a", 15)
    assert not locks.renew("web", "replica-b", 15)
    assert not locks.renew("elsewhere", "replica-a", 15)

    clock.advance(10)
    assert locks.renew("web", "replica-a", 15)
    clock.advance(10)  # 20s after acquiring, 10s after renewing

    assert locks.holder("web") == "replica-a"
    assert not locks.acquire("web", "replica-b", 15)


def test_renew_after_expiry_fails_even_if_nobody_took_the_lock(
    locks: VaultStore, clock: FakeClock
) -> None:
    assert locks.acquire("web", "replica-a", 15)
    clock.advance(15)

    assert not locks.renew("web", "replica-a", 15)
    assert locks.acquire("web", "replica-a", 15)


def test_release_frees_the_lock_only_for_its_holder(locks: VaultStore) -> None:
    assert locks.acquire("web", "replica-a", 15)
    locks.release("web", "replica-b")  # not b's: nothing happens
    assert locks.holder("web") == "replica-a"

    locks.release("web", "replica-a")

    assert locks.holder("web") is None
    assert not locks.renew("web", "replica-a", 15)
    assert locks.acquire("web", "replica-b", 15)
    locks.release("absent", "replica-a")  # releasing a lock nobody holds is harmless
    assert locks.holder("absent") is None


def test_locks_live_under_the_state_path(locks: VaultStore, vault: VaultFixture) -> None:
    assert locks.acquire("web", "replica-a", 15)

    raw = vault.read_raw("rotator/locks/web")

    assert raw is not None
    assert raw["holder"] == "replica-a"
    assert RFC3339_UTC.match(raw["expires_at"])
    assert model.parse_time(raw["expires_at"]) == datetime(2030, 1, 1, 12, 0, 15, tzinfo=UTC)


def test_a_lock_retaken_by_its_own_holder_is_resumed_without_a_read(
    locks: VaultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert locks.acquire("web", "replica-a", 15) is model.Grant.TAKEN  # first: read, then write
    reads: list[str] = []
    read = locks._kv_read

    def counted(path: str, purpose: str) -> Any:
        reads.append(path)
        return read(path, purpose)

    monkeypatch.setattr(locks, "_kv_read", counted)

    assert locks.renew("web", "replica-a", 15)
    locks.release("web", "replica-a")
    grant = locks.acquire("web", "replica-a", 15)

    assert grant is model.Grant.RESUMED
    assert reads == []  # renew, release and the resumed acquire only write (check-and-set)


def test_a_lock_another_replica_held_meanwhile_is_taken_not_resumed(
    make_store: MakeStore, clock: FakeClock
) -> None:
    a, b = make_store(now=clock.now), make_store(now=clock.now)
    assert a.acquire("web", "replica-a", 15)
    a.release("web", "replica-a")
    assert b.acquire("web", "replica-b", 15) is model.Grant.TAKEN
    b.release("web", "replica-b")

    grant = a.acquire("web", "replica-a", 15)

    assert grant is model.Grant.TAKEN  # b wrote the lock: a must read its state again
    assert a.holder("web") == "replica-a"


def test_renew_fails_once_another_replica_took_the_expired_lease(
    make_store: MakeStore, clock: FakeClock
) -> None:
    a, b = make_store(now=clock.now), make_store(now=clock.now)
    assert a.acquire("web", "replica-a", 15)
    clock.advance(16)
    assert b.acquire("web", "replica-b", 15)
    clock.value -= timedelta(seconds=10)  # a's clock runs late: only check-and-set stops it

    assert not a.renew("web", "replica-a", 15)
    a.release("web", "replica-a")  # not a's any more: nothing happens

    assert b.holder("web") == "replica-b"
    assert not a.acquire("web", "replica-a", 15)


def race_for_lock(stores: list[VaultStore], target: str) -> dict[str, bool]:
    """Every store tries ``acquire`` at the same moment, each in its own thread."""
    barrier = threading.Barrier(len(stores), timeout=30)
    results: dict[str, bool] = {}
    failures: list[BaseException] = []

    def contend(store: VaultStore, name: str) -> None:
        try:
            barrier.wait()
            results[name] = store.acquire(target, name, 15) is not None
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=contend, args=(store, f"replica-{i}"))
        for i, store in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert len(results) == len(stores)
    return results


def test_eight_threads_racing_for_a_lock_exactly_one_wins(make_store: MakeStore) -> None:
    stores = [make_store() for _ in range(8)]
    for round_number in range(5):
        target = f"race-{round_number}"

        results = race_for_lock(stores, target)

        winners = [name for name, won in results.items() if won]
        assert len(winners) == 1, results
        assert stores[0].holder(target) == winners[0]


def test_threads_sharing_one_store_race_safely(make_store: MakeStore) -> None:
    shared = make_store()

    results = race_for_lock([shared] * 8, "shared-race")

    assert sum(results.values()) == 1


# --- no secret in any message ------------------------------------------------------------------


def test_no_exception_message_or_repr_contains_a_token_or_secret(
    make_store: MakeStore, vault: VaultFixture
) -> None:
    read_only = vault.token_with_policy(
        f"{vault.mount}-leak", f'path "{vault.mount}/data/*" {{ capabilities = ["read"] }}'
    )
    invalid = "s.invalidTokenForLeakCheck987654321"
    key = new_key()
    root_store = make_store()
    raised: list[BaseException] = []

    def capture(call: Callable[[], object]) -> None:
        with pytest.raises(errors.VaultError) as info:
            call()
        raised.append(info.value)

    ro_store = make_store(auth=TokenAuth(model.Secret(read_only)))
    capture(lambda: ro_store.write_published("team/app", key, model.Published(None, None)))
    bad_store = make_store(auth=TokenAuth(model.Secret(invalid)))
    capture(lambda: bad_store.write_published("team/app", key, model.Published(None, None)))
    capture(bad_store.check)
    root_store.write_published("team/app", key, model.Published(None, None))
    capture(lambda: root_store.write_published("team/app", key, model.Published(None, None)))
    down = make_store(
        address=f"http://127.0.0.1:{servers.free_port()}", auth=TokenAuth(model.Secret(invalid))
    )
    capture(lambda: down.write_published("team/app", key, model.Published(None, None)))

    # (the dev server's root token is the word "root": not a useful thing to search for)
    secrets = [read_only, invalid, key.secret.reveal()]
    assert len(raised) == 5
    for exc in raised:
        for link in exception_chain(exc):
            for secret in secrets:
                assert secret not in str(link), (type(link), str(link))
                assert secret not in repr(link), (type(link), repr(link))
    for store in (ro_store, bad_store, root_store):
        for secret in secrets:
            assert secret not in repr(store)
    assert read_only not in repr(vault_adapter.TokenAuth(model.Secret(read_only)))


# --- the environment, read once ------------------------------------------------------------------


def test_a_proxy_from_the_environment_is_used_and_no_proxy_bypasses_it(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{servers.free_port()}")  # nobody there

    with pytest.raises(errors.VaultError):
        make_store().read_state("web")  # sent to the proxy, which refuses the connection

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert make_store().read_state("web").version == 0  # straight to Vault


def test_a_ca_bundle_from_the_environment_is_used_unless_ca_file_is_set(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "env-ca.pem"))

    assert make_store()._session.verify == str(tmp_path / "env-ca.pem")
    assert make_store(ca_file=str(tmp_path / "ca.pem"))._session.verify == str(tmp_path / "ca.pem")
