"""The end-to-end suite of tests/e2e/test_daemon.py through the fault proxy in OUTSCALE mode.

In OUTSCALE mode the proxy answers as EIM does where it differs from moto: CreateAccessKey's
UserName as an ORN, NoSuchEntity (and AccessDenied) with status 400, no pagination markers,
InvalidAction for the calls EIM lacks, requests signed by an Inactive key refused, and a key
locked out after four failed authentications in a row. The consumer uses the published key
through the proxy, so a consumer still holding a key after it went Inactive would fail.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.support import servers
from tests.support.crashkit import Watcher, keys_of, published_id
from tests.support.faultproxy import FaultProxy
from tests.support.harness import (
    Consumer,
    assert_rotated_cleanly,
    daemon_env,
    run_rotator,
    started,
    wait_for,
    watch_rotations,
    write_config,
)

__all__ = ["daemon_env", "started"]  # fixtures used by name

ROTATIONS = 3


@pytest.fixture
def outscale(iam_proxy: FaultProxy) -> Iterator[FaultProxy]:
    iam_proxy.set_outscale(True)
    yield iam_proxy
    assert iam_proxy.outscale


@pytest.fixture
def ec2_ready(iam_admin: servers.MotoAdmin) -> None:
    # moto builds its EC2 backend on the first EC2 call, stalling every call for seconds: do it
    # now, not under the daemon (the consumer uses EC2 as an OUTSCALE workload would)
    boto3.client(
        "ec2",
        endpoint_url=iam_admin.endpoint,
        region_name=iam_admin.region,
        aws_access_key_id=iam_admin.access_key_id,
        aws_secret_access_key=iam_admin.secret_access_key,
    ).describe_regions()


def _no_key_locked(proxy: FaultProxy, key_ids: Any) -> list[str]:
    return [k for k in key_ids if proxy.locked(k)]


@pytest.mark.timeout(180)
def test_outscale_daemon_rotates_three_times_without_a_consumer_failure(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    outscale: FaultProxy,
    ec2_ready: None,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    metrics_port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, metrics_port, endpoint=outscale.endpoint)
    consumer = Consumer(vault, outscale.endpoint, iam_admin.region)  # through the proxy
    run = watch_rotations(cfg, daemon_env, started, iam_admin, consumer, metrics_port, ROTATIONS)
    assert_rotated_cleanly(run, ROTATIONS, {iam_admin.secret_access_key, vault.root_token})
    observer, metrics = run.observer, run.metrics
    assert _no_key_locked(outscale, observer.history) == []
    # the OUTSCALE behaviours were really in play: NoSuchEntity as 400 on the first listing,
    # ORN user names in every CreateAccessKey answer (none of which broke the daemon)
    assert outscale.count("ListAccessKeys", status=400) >= 1
    assert outscale.count("ListAccessKeys", status=404) == 0
    assert outscale.count("CreateAccessKey", status=200) >= ROTATIONS + 1

    eim_errors = metrics.get('rotator_errors_total{component="eim",target="monitoring"}', 0)
    assert eim_errors == 0
    assert "Traceback" not in run.logs
    summaries = [e for e in run.events if e.get("event") == "pass_summary"]
    errors = [
        e["error"]
        for e in summaries
        if e["error"] is not None and not e["error"].startswith("pass interrupted by shutdown")
    ]
    assert errors == []


@pytest.mark.timeout(120)
def test_outscale_once_then_status_and_dry_run(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    outscale: FaultProxy,
    vault: Any,
    daemon_env: dict[str, str],
) -> None:
    cfg = write_config(
        tmp_path, iam_admin, vault, servers.free_port(), max_age="1h", endpoint=outscale.endpoint
    )

    def rotator(*args: str) -> subprocess.CompletedProcess[str]:
        return run_rotator(cfg, daemon_env, *args)

    plan = rotator("run", "--once", "--dry-run")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "create_user watcher_1" in plan.stdout and "create_key" in plan.stdout
    assert vault.read_raw("monitoring/watcher_1") is None
    assert outscale.count("CreateUser") == 0 and outscale.count("CreateAccessKey") == 0

    once = rotator("run", "--once")
    assert once.returncode == 0, once.stdout + once.stderr
    published = vault.read_raw("monitoring/watcher_1")
    assert published is not None and published["access_key_id"] in once.stdout

    status = rotator("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    [row] = json.loads(status.stdout)
    assert row["current_key_id"] == published["access_key_id"]
    assert row["foreign_keys"] == [] and row["pending_key_id"] is None
    assert published["secret_access_key"] not in status.stdout

    table = rotator("status")
    assert table.returncode == 0 and published["access_key_id"] in table.stdout

    dry_rotate = rotator("rotate", "monitoring", "--dry-run")
    assert dry_rotate.returncode == 0, dry_rotate.stdout + dry_rotate.stderr
    assert "create_key" in dry_rotate.stdout
    assert published_id(vault) == published["access_key_id"]  # the plan changed nothing
    assert set(keys_of(iam_admin)) == {published["access_key_id"]}

    forced = rotator("rotate", "monitoring")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    republished = vault.read_raw("monitoring/watcher_1")
    assert republished is not None
    assert republished["access_key_id"] != published["access_key_id"]
    assert set(keys_of(iam_admin)) == {published["access_key_id"], republished["access_key_id"]}

    unknown = rotator("rotate", "nope")
    assert unknown.returncode == 2 and "unknown target nope" in unknown.stderr
    assert "Traceback" not in plan.stderr + once.stderr + status.stderr + forced.stderr


@pytest.mark.timeout(120)
def test_outscale_a_slowly_propagating_key_is_published_without_a_lockout(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    outscale: FaultProxy,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    """EIM locks a key after four failed authentications in a row: the verification schedule
    (0 s, 10 s, 30 s) gets a key refused for 15 s through with two failures, unlocked."""
    cfg = write_config(
        tmp_path,
        iam_admin,
        vault,
        servers.free_port(),
        max_age="1h",
        verify_timeout="50s",
        endpoint=outscale.endpoint,
    )
    young = outscale.reject_young_keys(15)
    watcher = Watcher(iam_admin, vault, outscale.endpoint, users=("watcher_1",))
    log = tmp_path / "daemon.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "rotator", "run", "-c", str(cfg)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=daemon_env,
            cwd=tmp_path,
        )
    started.append(process)
    watcher.start()
    try:
        wait_for(lambda: keys_of(iam_admin), 30, "the new key", process)
        [key_id] = keys_of(iam_admin)
        wait_for(lambda: published_id(vault) == key_id, 60, "the key published", process)
        # the consumer reads Vault every 0.25 s: let it use what was published before stopping
        wait_for(lambda: watcher.uses >= 1, 30, "the consumer to use the published key", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        watcher.finish()
    refused = young.hits
    assert 1 <= refused <= 2, refused  # fewer than four failures in a row: never locked
    assert not outscale.locked(key_id)
    assert outscale.count("GetUser", key_id=key_id) == refused + 1
    assert watcher.problems == [] and watcher.uses >= 1
    assert "Traceback" not in log.read_text()
