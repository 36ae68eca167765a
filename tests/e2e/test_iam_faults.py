"""IAM faults against the daemon and `run --once` as processes, through the IAM fault proxy.

- transient faults (throttling as 400 Throttling, 429, 503, 500; a dropped answer; a read timeout)
  are retried by the client (botocore standard mode: capped exponential backoff with jitter) and
  the pass still succeeds; the proxy's call log shows the retries;
- a permanent fault (AccessDenied on CreateAccessKey) is reported once per pass, not hot-looped,
  and counted (eim errors, failed rotations);
- a new key refused for 15 s is published once it verifies, with at most three verification
  attempts in a minute;
- a key that never verifies is deleted, the failure counted, and a fresh key tried after backoff;
- an answer lost after CreateAccessKey leaves no leaked key after the next pass.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support import servers
from tests.support.crashkit import (
    Daemon,
    Watcher,
    crash_config,
    keys_of,
    published_id,
    run_cli,
    start_daemon,
    state_of,
    tracked,
)
from tests.support.faultproxy import FaultProxy
from tests.support.harness import daemon_env, scrape, started, wait_for

__all__ = ["daemon_env", "started"]  # fixtures used by name

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(port: int, name: str, **labels: str) -> float:
    """The value of one sample of /metrics, labels matched in any order (0 when absent)."""
    for key, value in scrape(port).items():
        found = _SAMPLE.match(key)
        if (
            found
            and found.group(1) == name
            and dict(_LABEL.findall(found.group(2) or "")) == labels
        ):
            return value
    return 0.0


def config(
    tmp_path: Path, iam: servers.MotoAdmin, vault: Any, proxy: FaultProxy, **kw: Any
) -> Path:
    attempts = kw.pop("max_attempts", 4)
    read_timeout = kw.pop("read_timeout", "5s")
    cfg = crash_config(tmp_path, iam, vault, endpoint=proxy.endpoint, bystander=False, **kw)
    text = cfg.read_text().replace("max_attempts: 2", f"max_attempts: {attempts}")
    cfg.write_text(text.replace("read_timeout: 5s", f"read_timeout: {read_timeout}"))
    return cfg


def metrics_port(cfg: Path) -> int:
    found = re.search(r"listen: 127\.0\.0\.1:(\d+)", cfg.read_text())
    assert found is not None
    return int(found.group(1))


def statuses(proxy: FaultProxy, action: str, key_id: str | None = None) -> list[int | None]:
    return [
        c.status
        for c in proxy.calls
        if c.action == action and (key_id is None or c.key_id == key_id)
    ]


def verification_times(daemon: Daemon, key_id: str) -> list[float]:
    return [
        datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        for e in daemon.events()
        if e.get("event") == "key_verification" and e.get("key_id") == key_id
    ]


def at_most_per_minute(times: list[float], limit: int) -> bool:
    return all(sum(1 for t in times if start <= t < start + 60) <= limit for start in times)


@dataclass
class Rig:
    """What every test here works with: moto's admin, the fault proxy, Vault, the daemon's
    environment and the processes started; configs go to ``tmp_path``, through the proxy."""

    tmp_path: Path
    admin: servers.MotoAdmin
    proxy: FaultProxy
    vault: Any
    env: dict[str, str]
    started: list[subprocess.Popen[bytes]]

    def config(self, **kw: Any) -> Path:
        """:func:`config` for this test, ``max_age`` 1h (every test here) unless given."""
        kw.setdefault("max_age", "1h")
        return config(self.tmp_path, self.admin, self.vault, self.proxy, **kw)

    def cli(self, cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(cfg, self.env, *args)

    def start(self, cfg: Path) -> Daemon:
        return start_daemon(cfg, self.env, self.started, self.tmp_path / "daemon.log")


@pytest.fixture
def rig(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    iam_proxy: FaultProxy,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> Rig:
    return Rig(tmp_path, iam_admin, iam_proxy, vault, daemon_env, started)


@pytest.fixture
def watcher(iam_admin: servers.MotoAdmin, vault: Any, iam_proxy: FaultProxy) -> Iterator[Watcher]:
    w = Watcher(iam_admin, vault, iam_proxy.endpoint, users=("watcher_1",))
    yield w
    w.finish()


# --- transient faults: retried, the pass succeeds ------------------------------------------------


STATUS = {"throttling": 400, "too_many_requests": 429, "unavailable": 503, "internal": 500}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", list(STATUS))
def test_transient_error_answers_are_retried_and_the_pass_succeeds(fault: str, rig: Rig) -> None:
    cfg = rig.config()
    # two faults on two calls of the pass: each retried within the call (max_attempts 4)
    rig.proxy.inject(fault, action="ListAccessKeys", count=2)
    rig.proxy.inject(fault, action="ListAttachedGroupPolicies", count=2)
    once = rig.cli(cfg, "run", "--once")
    assert once.returncode == 0, once.stdout + once.stderr
    status = STATUS[fault]
    assert statuses(rig.proxy, "ListAccessKeys")[:3] == [status, status, 404]  # no user yet
    assert statuses(rig.proxy, "ListAttachedGroupPolicies")[:3] == [status, status, 404]  # no group
    assert len(keys_of(rig.admin)) == 1
    assert published_id(rig.vault) in keys_of(rig.admin)
    assert "Traceback" not in once.stdout + once.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", list(STATUS))
def test_a_transient_error_on_create_access_key_is_retried_by_the_next_pass_without_a_leak(
    fault: str, rig: Rig
) -> None:
    """CreateAccessKey is not idempotent: one attempt a pass, the next pass is the retry."""
    cfg = rig.config()
    rig.proxy.inject(fault, action="CreateAccessKey", count=1)
    failed = rig.cli(cfg, "run", "--once")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "transient: run the command again later" in failed.stdout
    assert keys_of(rig.admin) == {}
    retried = rig.cli(cfg, "run", "--once")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert statuses(rig.proxy, "CreateAccessKey") == [STATUS[fault], 200]
    state = state_of(rig.vault)
    assert state is not None and set(keys_of(rig.admin)) == tracked(state)
    assert published_id(rig.vault) in keys_of(rig.admin)


@pytest.mark.timeout(90)
def test_a_dropped_answer_and_a_read_timeout_are_retried_and_the_pass_succeeds(rig: Rig) -> None:
    cfg = rig.config(read_timeout="1s")
    rig.proxy.drop_response(action="ListAttachedGroupPolicies", count=1)  # idempotent: see below
    stuck = rig.proxy.hold(action="ListPolicies", count=1)  # never answered: a read timeout
    started_at = time.monotonic()
    once = rig.cli(cfg, "run", "--once")
    took = time.monotonic() - started_at
    assert stuck.arrived == 1
    stuck.release(forward=False)
    assert stuck.wait_finished(10)
    assert once.returncode == 0, once.stdout + once.stderr
    assert statuses(rig.proxy, "ListAttachedGroupPolicies")[:2] == [None, 404]  # dropped, retried
    assert rig.proxy.count("ListPolicies", unanswered=True) == 1
    assert rig.proxy.count("ListPolicies") >= 2  # the timed-out call was sent again
    assert published_id(rig.vault) in keys_of(rig.admin)
    assert took < 30


# --- a permanent fault: reported once per pass, not hot-looped ----------------------------------


@pytest.mark.timeout(120)
def test_access_denied_on_create_is_reported_once_per_pass_counted_and_not_hot_looped(
    rig: Rig,
) -> None:
    cfg = rig.config()
    port = metrics_port(cfg)
    denied = rig.proxy.inject("access_denied", action="CreateAccessKey")
    daemon = rig.start(cfg)
    wait_for(lambda: denied.hits >= 1, 30, "the first denied CreateAccessKey", daemon.process)
    first_at, first_errors = (
        time.monotonic(),
        metric(port, "rotator_errors_total", component="eim", target="monitoring"),
    )
    passes_before = len(daemon.summaries())
    wait_for(lambda: len(daemon.summaries()) >= passes_before + 6, 30, "six passes", daemon.process)
    window = time.monotonic() - first_at
    passes = len(daemon.summaries()) - passes_before
    calls = denied.hits - 1
    answered = statuses(rig.proxy, "CreateAccessKey")
    errors_now = metric(port, "rotator_errors_total", component="eim", target="monitoring")
    failures = metric(port, "rotator_rotations_total", result="failure", target="monitoring")

    # one attempt a pass (check_interval 1s): no retry of a permanent error, no hot loop
    assert calls <= passes + 1, (calls, passes)
    assert calls <= window / 1.0 + 2, (calls, window)
    assert set(answered) == {403}, answered  # never forwarded, never retried into a key
    # reported once per pass: one pass_failed line per failed pass, naming the action
    failed = [e for e in daemon.events() if e.get("event") == "pass_failed"]
    failed_summaries = [s for s in daemon.summaries() if s["error"]]
    assert len(failed) == len(failed_summaries)
    assert all("iam:CreateAccessKey" in e["error"] for e in failed)
    assert errors_now >= first_errors + passes - 1
    assert failures >= passes - 1 >= 1
    assert keys_of(rig.admin) == {}

    denied.remove()  # the permission is granted: the next pass issues the key
    wait_for(lambda: published_id(rig.vault) is not None, 20, "a key once allowed", daemon.process)
    wait_for(
        lambda: metric(port, "rotator_rotations_total", result="success", target="monitoring") >= 1,
        10,
        "the success counted",
        daemon.process,
    )
    assert daemon.terminate() == 0


# --- a new key refused for 15 s -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_key_refused_for_15s_is_published_after_it_verifies_with_at_most_three_attempts_a_minute(
    rig: Rig, watcher: Watcher
) -> None:
    cfg = rig.config(verify_timeout="50s")
    young = rig.proxy.reject_young_keys(15)
    daemon = rig.start(cfg)
    watcher.start()
    wait_for(lambda: keys_of(rig.admin), 30, "the new key", daemon.process)
    [key_id] = keys_of(rig.admin)
    created = time.monotonic()
    wait_for(lambda: published_id(rig.vault) == key_id, 60, "the key published", daemon.process)
    published_after = time.monotonic() - created
    # the consumer reads Vault every 0.25 s: let it use what was published before stopping
    wait_for(lambda: watcher.uses >= 1, 30, "the consumer to use the key", daemon.process)
    assert daemon.terminate() == 0
    watcher.finish()

    # GetUser signed by the new key: refused while young, then AccessDenied (the key
    # authenticated; its user may not call GetUser), which the rotator counts as verified
    tries = statuses(rig.proxy, "GetUser", key_id)
    assert 2 <= len(tries) <= 3, tries  # the whole run is within a minute
    assert young.hits == len(tries) - 1, (young.hits, tries)
    outcomes = [
        e["outcome"]
        for e in daemon.events()
        if e.get("event") == "key_verification" and e.get("key_id") == key_id
    ]
    assert outcomes == ["not_yet"] * (len(tries) - 1) + ["valid"], outcomes
    times = verification_times(daemon, key_id)
    assert len(times) == len(tries) and at_most_per_minute(times, 3), times
    assert published_after >= 14  # not before it verified
    assert watcher.problems == []  # the consumer never got the key while it was refused
    assert watcher.uses >= 1


# --- a key that never verifies --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_key_that_never_verifies_is_deleted_counted_and_a_fresh_one_tried_after_backoff(
    rig: Rig, watcher: Watcher
) -> None:
    cfg = rig.config(verify_timeout="20s")
    port = metrics_port(cfg)
    rig.proxy.reject_young_keys(1000)
    daemon = rig.start(cfg)
    watcher.start()
    wait_for(lambda: keys_of(rig.admin), 30, "the first key", daemon.process)
    [first] = keys_of(rig.admin)
    wait_for(
        lambda: len(watcher.history) >= 2 and first in watcher.deleted,
        60,
        "the first key deleted and a fresh one created",
        daemon.process,
    )
    failures = metric(port, "rotator_rotations_total", result="failure", target="monitoring")
    verify_errors = metric(port, "rotator_errors_total", component="verify", target="monitoring")
    state = state_of(rig.vault)
    assert daemon.terminate() == 0
    watcher.finish()

    fresh = [k for k in watcher.history if k != first]
    assert fresh, watcher.history
    assert failures >= 1 and verify_errors >= 1
    assert published_id(rig.vault) is None  # nothing unverified was ever published
    assert watcher.key_ids == []
    tries = statuses(rig.proxy, "GetUser", first)
    assert 2 <= len(tries) <= 3 and set(tries) == {403}, tries  # all refused as young
    assert at_most_per_minute(verification_times(daemon, first), 3)
    assert watcher.history[first] == ["Active"]  # deleted, never published
    assert state is not None and state["outcome"]["failures"] >= 1
    gave_up = [
        e
        for e in daemon.events()
        if e.get("event") == "key_verification" and e.get("verdict") == "give_up"
    ]
    assert [e["key_id"] for e in gave_up][:1] == [first]


# --- an answer lost after CreateAccessKey ---------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("phase", ["first-key", "rotation"])
def test_an_answer_lost_after_create_access_key_leaves_no_leaked_key_after_the_next_pass(
    phase: str, rig: Rig
) -> None:
    cfg = rig.config()
    if phase == "rotation":
        assert rig.cli(cfg, "run", "--once").returncode == 0
        before = published_id(rig.vault)
        assert before is not None
    rig.proxy.drop_response(action="CreateAccessKey", count=1)
    if phase == "rotation":
        lost = rig.cli(cfg, "rotate", "monitoring")
    else:
        lost = rig.cli(cfg, "run", "--once")
    assert rig.proxy.count("CreateAccessKey", unanswered=True) == 1
    nxt = rig.cli(cfg, "run", "--once")  # the next pass
    state = state_of(rig.vault)
    assert state is not None
    keys = keys_of(rig.admin)
    report = f"{lost.stdout}\n{nxt.stdout}\nkeys {keys}\nstate {state}"
    assert set(keys) == tracked(state), report
    assert not state.get("pending") and not state.get("intent"), report
    assert published_id(rig.vault) == state["current"]["key_id"], report
