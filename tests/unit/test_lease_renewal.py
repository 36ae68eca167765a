"""Lease renewal: one renewer thread per engine, every third of the TTL; a lost lease stops the
pass before its next change (DESIGN.md section 3). Real time at a small TTL; every wait is on an
event with a deadline, never a sleep."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from rotator import engine, errors, model
from tests.unit.fakes import FakeLock
from tests.unit.test_engine import SPEC, World

TTL = 0.15  # renewals every 50 ms
DEADLINE = 5.0


@dataclass
class CountingLock:
    """Answers renewals as told and counts them, signalling each one."""

    answer: bool | Exception = True
    renewals: list[str] = field(default_factory=list)
    renewed: threading.Event = field(default_factory=threading.Event)

    def renew(self, target: str, holder: str, ttl_seconds: float) -> bool:
        self.renewals.append(target)
        self.renewed.set()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def wait_for(self, count: int) -> None:
        while len(self.renewals) < count:
            assert self.renewed.wait(DEADLINE), f"{len(self.renewals)} renewals, {count} wanted"
            self.renewed.clear()


def renewer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lease-renewer"]


@pytest.mark.timeout(30)
def test_one_thread_renews_every_held_lease_until_it_is_dropped() -> None:
    lock = CountingLock()
    renewer = engine._Renewer(lock, "me")  # type: ignore[arg-type]
    first, second = engine._Lease("a", TTL), engine._Lease("b", TTL)
    renewer.add(first)
    renewer.add(second)

    lock.wait_for(4)
    assert {"a", "b"} <= set(lock.renewals)
    assert len([t for t in renewer_threads() if t is renewer._thread]) == 1
    renewer.drop(first)
    done = len(lock.renewals)
    lock.wait_for(done + 2)

    assert set(lock.renewals[done:]) == {"b"}  # a dropped lease is never renewed again
    assert not first.lost.is_set() and not second.lost.is_set()
    renewer.drop(second)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "answer", [False, errors.VaultUnavailable("Vault unreachable"), KeyError("a bug")]
)
def test_a_failed_renewal_marks_the_lease_lost_and_stops_renewing_it(
    answer: bool | Exception,
) -> None:
    lock = CountingLock(answer=answer)
    renewer = engine._Renewer(lock, "me")  # type: ignore[arg-type]
    lease = engine._Lease("a", TTL)
    renewer.add(lease)

    assert lease.lost.wait(DEADLINE)
    assert lease.dropped and lock.renewals == ["a"]
    renewer.drop(lease)  # what the pass does on its way out: fine after a loss
    lock.answer = True
    later = engine._Lease("b", TTL)
    renewer.add(later)  # the thread lives on for the other leases
    lock.wait_for(2)
    assert lock.renewals[-1] == "b" and not later.lost.is_set()
    renewer.drop(later)


@pytest.mark.timeout(30)
def test_drop_waits_for_a_renewal_in_flight_so_the_release_comes_after_it() -> None:
    entered, leave = threading.Event(), threading.Event()

    class SlowLock(CountingLock):
        def renew(self, target: str, holder: str, ttl_seconds: float) -> bool:
            entered.set()
            assert leave.wait(DEADLINE)
            return super().renew(target, holder, ttl_seconds)

    lock = SlowLock()
    renewer = engine._Renewer(lock, "me")  # type: ignore[arg-type]
    lease = engine._Lease("a", TTL)
    renewer.add(lease)
    assert entered.wait(DEADLINE)
    dropped = threading.Event()
    dropper = threading.Thread(target=lambda: (renewer.drop(lease), dropped.set()))
    dropper.start()

    assert not dropped.wait(0.2)  # still renewing: drop must not return yet
    leave.set()
    assert dropped.wait(DEADLINE)
    dropper.join(DEADLINE)
    assert lease.dropped


class LosingLock(FakeLock):
    """Grants the lease, then refuses every renewal (another replica took it over)."""

    refused: threading.Event

    def renew(self, target: str, holder: str, ttl_seconds: float) -> bool:
        self.refused.set()
        return False


@pytest.mark.timeout(30)
def test_a_pass_that_lost_its_lease_publishes_nothing_and_reports_a_lock_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = World()
    lock = LosingLock(w.clock)
    lock.refused = threading.Event()
    w.engine = engine.Engine(w.iam, w.vault, w.clock, lock=lock, lock_ttl=TTL)
    real_verify = w.iam.verify_key
    leases: list[engine._Lease] = []

    class Recorded(engine._Lease):
        def __init__(self, target: str, ttl: float) -> None:
            super().__init__(target, ttl)
            leases.append(self)

    monkeypatch.setattr(engine, "_Lease", Recorded)

    def verify_after_the_loss(key_id: str, secret: model.Secret) -> model.VerifyResult:
        # the renewer marks the lease lost just after the refused renewal returns: wait for
        # the mark itself, which the pass checks, not for the refusal
        assert leases and leases[0].lost.wait(DEADLINE)
        return real_verify(key_id, secret)

    w.iam.verify_key = verify_after_the_loss  # type: ignore[method-assign]
    report = w.engine.run_pass(SPEC)

    assert not report.ok and "lost the lock" in (report.error or "")
    assert "lock" in report.error_components
    assert w.vault.published_secret(SPEC.secret_path) is None  # stopped before publishing
    assert w.state().pending is not None  # the next pass resumes from the stored pending key
