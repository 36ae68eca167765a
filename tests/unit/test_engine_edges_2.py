"""Edges a review of the changes of 2026-12-04 found: stale-state recovery, restore tries kept
across processes, periodic tokens."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import structlog.testing

from rotator import errors, model, rotation
from rotator.adapters.vault import AppRoleAuth, TokenAuth, VaultStore
from tests.unit.fakes import T0
from tests.unit.test_engine import PATH, World, rotated_twice_over
from tests.unit.test_engine_edges import rolled_back_to_pending

# --- R1: StateStale never clears once the pending key is deleted (the remedy it gives) ---------


def test_stale_pending_clears_once_the_pending_key_is_deleted_by_hand_as_the_error_says() -> None:
    w = World()
    k2, _, _ = rolled_back_to_pending(w)
    w.clock.advance(seconds=30)
    first = w.run()
    assert "delete the pending key by hand: the next pass forgets it" in (first.error or "")
    # the operator keeps K3 and follows the message: deletes the pending key K2 in IAM
    w.iam.users["watcher_1"] = [k for k in w.iam.users["watcher_1"] if k.key_id != k2]
    for _ in range(3):
        w.clock.advance(seconds=30)
        report = w.run()
    assert "looks rolled back" not in (report.error or ""), (
        f"blocked for ever after the documented fix: {report.error}"
    )
    assert w.state().pending is None


def test_stale_pending_ignores_a_pending_key_iam_no_longer_lists() -> None:
    # the pure core: a pending key gone from IAM can be published by nobody
    now = T0
    pending = model.PendingKey(
        key_id="AKIAPENDING", secret=model.Secret("s" * 40), created=now, replaces="AKIAOLD"
    )
    state = model.TargetState(pending=pending)
    newer = model.AccessKey("AKIANEWER", model.KeyStatus.ACTIVE, now.replace(hour=1))
    assert rotation.stale_pending([newer], state, "AKIANEWER") is None


# --- R2: a failed restore is re-verified by every process: OUTSCALE's lock-out -----------------


def test_a_failed_restore_is_not_retried_by_each_new_process_into_outscales_lockout() -> None:
    # the version holding the current key has a wrong secret; the latest holds a wrong id.
    # Each replica (or each `run --once`, each restart) tries the restore again: every try is a
    # failed signature of the *published, working* current key; four in a row lock it out.
    w = World()
    _, current = rotated_twice_over(w)
    doc = w.vault.published[PATH]
    w.vault.published_versions[PATH][doc.version]["secret_access_key"] = "not-the-secret"
    w.vault.by_hand(PATH, {**doc.data, "access_key_id": "AKIAWRONG"})
    before = w.iam.verify_attempts[current]
    for _ in range(rotation.LOCKOUT_AFTER):
        w.restart()  # another replica's pass, or the next `rotator run --once`
        w.clock.advance(seconds=30)
        assert w.run().blocked
    failed = w.iam.verify_attempts[current] - before
    assert failed < rotation.LOCKOUT_AFTER, (
        f"{failed} failed signatures in a row of the current key {current} (restore tries of "
        "the same secret version): OUTSCALE locks that key out"
    )


# --- R3: renewal asks 3 periods: a periodic token shorter than that is re-logged every probe ---


class _FakeVaultClient:
    """hvac.Client stand-in: a periodic token (Vault resets its TTL to the period on renewal,
    whatever the increment asked)."""

    def __init__(self, period: int) -> None:
        self.period = period
        self.token = ""
        self.logins = 0
        self.renewals: list[int] = []
        self.auth = SimpleNamespace(
            token=SimpleNamespace(lookup_self=self._lookup, renew_self=self._renew),
            approle=SimpleNamespace(login=self._login),
        )

    def _lookup(self) -> dict[str, Any]:
        # a periodic token between two renewals: half its period left
        return {"data": {"ttl": self.period // 2, "creation_ttl": self.period, "renewable": True}}

    def _renew(self, increment: int) -> dict[str, Any]:
        self.renewals.append(increment)
        return {"auth": {"lease_duration": self.period}}

    def _login(self, **kw: Any) -> dict[str, Any]:
        self.logins += 1
        return {
            "auth": {
                "client_token": f"hvs.token-{self.logins:020d}",
                "lease_duration": self.period,
                "renewable": True,
            }
        }


def _store(auth: Any, client: _FakeVaultClient) -> VaultStore:
    store = VaultStore(address="http://127.0.0.1:17399", auth=auth)
    store._client = client
    store._login_client = client
    return store


def test_a_periodic_approle_token_is_renewed_not_replaced_by_a_login_every_probe() -> None:
    client = _FakeVaultClient(period=30)
    store = _store(AppRoleAuth("role", model.Secret("secret-id-0123456789")), client)
    store.login()
    for _ in range(4):  # four readiness probes, 15 s apart
        store.refresh_token(period=15.0)
    assert client.logins == 1, (
        f"{client.logins - 1} new logins in 4 refreshes (renewals asked {client.renewals}, "
        f"Vault gave {client.period}: taken for 'max TTL reached')"
    )


def test_a_static_periodic_token_is_not_reported_as_expiring_every_probe() -> None:
    client = _FakeVaultClient(period=30)
    store = _store(TokenAuth(model.Secret("hvs.static-token-0123456789")), client)
    try:
        store.refresh_token(period=15.0)
    except errors.VaultDenied as exc:
        pytest.fail(f"a periodic token renewed fine is reported as dying: {exc}")


def test_a_token_living_less_than_a_refresh_period_is_warned_of_once() -> None:
    client = _FakeVaultClient(period=10)  # a periodic token of 10 s, refreshed every 15 s
    store = _store(TokenAuth(model.Secret("hvs.static-token-0123456789")), client)
    with structlog.testing.capture_logs() as logs:
        store.refresh_token(period=15.0)
        store.refresh_token(period=15.0)
    short = [e for e in logs if e["event"] == "vault_token_short"]
    assert len(short) == 1 and short[0]["ttl"] == 10 and short[0]["refresh_period"] == 15.0
    assert "45s" in short[0]["fix"]
    assert "hvs.static" not in repr(logs)
