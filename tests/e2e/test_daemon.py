"""The daemon as a process, against moto's IAM server (authentication enforced) and OpenBao.

Second-scale timings drive it through several rotations while a consumer reads Vault every half
second and uses what it reads against the IAM server, and an observer lists the user's keys.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support import servers
from tests.support.crashkit import VaultProxy
from tests.support.harness import (
    Consumer,
    assert_rotated_cleanly,
    daemon_env,
    http_status,
    run_rotator,
    scrape,
    start_daemon,
    started,
    wait_for,
    watch_rotations,
    write_config,
)

__all__ = ["daemon_env", "started"]  # fixtures used by name

ROTATIONS = 3


@pytest.mark.timeout(180)
def test_daemon_rotates_three_times_without_a_consumer_failure(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    metrics_port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, metrics_port)
    consumer = Consumer(vault, iam_admin.endpoint, iam_admin.region)
    run = watch_rotations(cfg, daemon_env, started, iam_admin, consumer, metrics_port, ROTATIONS)
    assert_rotated_cleanly(run, ROTATIONS, {iam_admin.secret_access_key, vault.root_token})


def test_once_exits_1_and_names_the_problem_when_vault_is_unreachable(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port())
    dead = f"http://127.0.0.1:{servers.free_port()}"
    cfg.write_text(cfg.read_text().replace(vault.address, dead))
    result = subprocess.run(
        [sys.executable, "-m", "rotator", "run", "--once", "-c", str(cfg)],
        capture_output=True,
        env=daemon_env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert b"unreachable" in result.stdout + result.stderr
    assert b"Traceback" not in result.stdout + result.stderr
    # no IAM change without Vault: the user was never created
    with pytest.raises(ClientError):
        iam_admin.client().get_user(UserName="watcher_1")


def test_bad_config_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port())
    cfg.write_text(cfg.read_text().replace("grace: 2s", "grace: 2 seconds"))
    result = subprocess.run(
        [sys.executable, "-m", "rotator", "check-config", "-c", str(cfg)],
        capture_output=True,
        env=daemon_env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "defaults.grace" in lines[0], lines
    assert result.stdout == b""


def test_once_then_status_and_dry_run(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port(), max_age="1h")

    def rotator(*args: str) -> subprocess.CompletedProcess[str]:
        return run_rotator(cfg, daemon_env, *args)

    plan = rotator("run", "--once", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "create_user watcher_1" in plan.stdout and "create_key" in plan.stdout
    assert vault.read_raw("monitoring/watcher_1") is None  # the dry run changed nothing

    once = rotator("run", "--once")
    assert once.returncode == 0, once.stderr
    published = vault.read_raw("monitoring/watcher_1")
    assert published is not None and published["access_key_id"] in once.stdout

    status = rotator("status", "--json")
    assert status.returncode == 0, status.stderr
    [row] = json.loads(status.stdout)
    assert row["current_key_id"] == published["access_key_id"]
    assert row["foreign_keys"] == [] and row["pending_key_id"] is None
    assert published["secret_access_key"] not in status.stdout

    table = rotator("status")
    assert table.returncode == 0 and published["access_key_id"] in table.stdout

    forced = rotator("rotate", "monitoring")
    assert forced.returncode == 0, forced.stderr
    republished = vault.read_raw("monitoring/watcher_1")
    assert republished is not None
    assert republished["access_key_id"] != published["access_key_id"]

    unknown = rotator("rotate", "nope")
    assert unknown.returncode == 2 and "unknown target nope" in unknown.stderr

    # a hand edit swaps the published fields: status shows the id field, never the secret
    secret = republished["secret_access_key"]
    swapped = {**republished, "access_key_id": secret, "secret_access_key": "AKIA-by-hand"}
    vault.client().secrets.kv.v2.create_or_update_secret(
        path="monitoring/watcher_1", secret=swapped, mount_point=vault.mount
    )
    for shown in (rotator("status", "--json"), rotator("status")):
        assert shown.returncode == 1  # the published secret does not hold a working key
        assert secret not in shown.stdout + shown.stderr


def run_until_first_key(
    cfg: Path,
    env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
    err: Path,
    vault: Any,
) -> subprocess.Popen[bytes]:
    """`rotator run` with its stderr (the log) in ``err``, once it has published a first key."""
    process = start_daemon(cfg, env, started, err)
    wait_for(lambda: vault.read_raw("monitoring/watcher_1"), 30, "the first key", process)
    return process


def logged(err: Path, event: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines in ``err`` whose event is ``event``, in order (a last
    line the daemon is still writing is not one yet)."""
    complete = err.read_text().rpartition("\n")[0]
    lines = (json.loads(line) for line in complete.splitlines() if line)
    return [e for e in lines if e["event"] == event]


@pytest.mark.timeout(120)
def test_sighup_keeps_the_old_config_when_invalid_and_applies_a_valid_one(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, port, max_age="1h")
    good = cfg.read_text()
    err = tmp_path / "stderr.log"
    process = run_until_first_key(cfg, daemon_env, started, err, vault)
    first = vault.read_raw("monitoring/watcher_1")["access_key_id"]
    assert http_status(port, "/healthz") == 200
    assert http_status(port, "/readyz") == 200

    cfg.write_text(good.replace("max_age: 1h", "max_age: 1 hour"))
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reload_failed" in err.read_text(), 30, "the failed reload", process)
    assert scrape(port)['rotator_errors_total{component="config",target=""}'] == 1
    assert process.poll() is None

    # a shorter max_age takes effect at once: the key's age counts from its creation date
    other_port = servers.free_port()
    cfg.write_text(
        good.replace("max_age: 1h", "max_age: 5s")
        .replace("grace: 2s", "grace: 1s")
        .replace("inactive_period: 2s", "inactive_period: 1s")
        .replace("verify_timeout: 4s", "verify_timeout: 3s")
        .replace("workers: 2", "workers: 3")
        .replace(f"127.0.0.1:{port}", f"127.0.0.1:{other_port}")
    )
    process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (vault.read_raw("monitoring/watcher_1") or {}).get("access_key_id") != first,
        30,
        "a rotation under the reloaded max_age",
        process,
    )
    assert "config_reloaded" in err.read_text()
    # what a reload cannot change keeps its running value and says so
    [workers] = logged(err, "workers_unchanged")
    assert workers["running"] == 2 and workers["configured"] == 3
    assert logged(err, "metrics_listen_unchanged")[0]["running"] == f"127.0.0.1:{port}"
    assert http_status(port, "/healthz") == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


@pytest.mark.timeout(120)
def test_sighup_with_a_duration_too_long_for_dates_keeps_the_daemon_running(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, port, max_age="1h")
    err = tmp_path / "stderr.log"
    process = run_until_first_key(cfg, daemon_env, started, err, vault)

    cfg.write_text(cfg.read_text().replace("grace: 2s", "grace: 99999999999d"))
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: "config_reload_failed" in err.read_text(), 30, "the failed reload", process)

    assert process.poll() is None
    assert "defaults.grace" in err.read_text() and "at most 3650d" in err.read_text()
    assert "Traceback" not in err.read_text()
    assert http_status(port, "/healthz") == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_rotate_with_a_target_named_twice_rotates_it_once(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port(), max_age="1h")
    once = run_rotator(cfg, daemon_env, "run", "--once")
    assert once.returncode == 0, once.stderr
    first = vault.read_raw("monitoring/watcher_1")["access_key_id"]

    forced = run_rotator(cfg, daemon_env, "rotate", "monitoring", "monitoring")

    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert forced.stdout.count("monitoring: rotated") == 1, forced.stdout
    assert forced.stdout.strip().count("\n") == 0
    assert vault.read_raw("monitoring/watcher_1")["access_key_id"] != first


def test_a_rejected_token_names_where_it_came_from(
    tmp_path: Path, iam_admin: servers.MotoAdmin, vault: Any, daemon_env: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port())
    from_env = run_rotator(cfg, {**daemon_env, "VAULT_TOKEN": "exported-in-the-shell"}, "status")
    (tmp_path / "vault-token").write_text("not-a-token-vault-knows\n")
    from_file = run_rotator(cfg, daemon_env, "status")

    assert from_env.returncode == 1, from_env.stdout + from_env.stderr
    assert "the token comes from $VAULT_TOKEN in rotator's environment" in from_env.stdout
    assert from_file.returncode == 1, from_file.stdout + from_file.stderr
    assert f"the token comes from vault.auth.token_file ({tmp_path / 'vault-token'})" in (
        from_file.stdout
    )
    for done in (from_env, from_file):
        assert "exported-in-the-shell" not in done.stdout + done.stderr
        assert "not-a-token-vault-knows" not in done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr


# The reload request arrives while the config loads, before the daemon's own handlers exist.
HUP_WHILE_STARTING = """
import os, signal, sys
from rotator import config, entry
load = config.load
def load_then_hup(path):
    os.kill(os.getpid(), signal.SIGHUP)
    return load(path)
config.load = load_then_hup
raise SystemExit(entry.main(sys.argv[1:]))
"""


@pytest.mark.timeout(90)
def test_a_sighup_while_the_daemon_starts_is_a_reload_once_it_runs_not_its_end(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, port, max_age="1h")
    err = tmp_path / "stderr.log"
    process = start_daemon(cfg, daemon_env, started, err, program=("-c", HUP_WHILE_STARTING))

    wait_for(lambda: "config_reloaded" in err.read_text(), 30, "the reload", process)
    wait_for(lambda: vault.read_raw("monitoring/watcher_1"), 30, "the first key", process)
    assert process.poll() is None
    assert http_status(port, "/healthz") == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


@pytest.mark.timeout(120)
def test_a_burst_of_hup_int_and_term_stops_the_daemon_every_time(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    # Ctrl-C on `make demo` sends SIGINT from the terminal and SIGTERM from demo.py at once: a
    # handler interrupted by the next signal once deadlocked the daemon for good.
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port(), max_age="1h")
    err = tmp_path / "stderr.log"
    process = run_until_first_key(cfg, daemon_env, started, err, vault)
    for _ in range(3):  # the running daemon takes these as reloads
        for sig in (signal.SIGHUP, signal.SIGHUP, signal.SIGHUP):
            process.send_signal(sig)
    wait_for(lambda: logged(err, "config_reloaded"), 30, "a reload", process)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        process.send_signal(sig)

    assert process.wait(timeout=30) == 0
    assert [e["event"] for e in logged(err, "daemon_stopped")] == ["daemon_stopped"]


@pytest.mark.timeout(120)
def test_a_reload_moving_the_secret_path_publishes_the_current_key_there_and_makes_none(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    cfg = write_config(tmp_path, iam_admin, vault, servers.free_port(), max_age="1h")
    err = tmp_path / "stderr.log"
    process = run_until_first_key(cfg, daemon_env, started, err, vault)
    first = vault.read_raw("monitoring/watcher_1")

    cfg.write_text(cfg.read_text().replace("monitoring/watcher_1", "moved/watcher_1"))
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: vault.read_raw("moved/watcher_1"), 30, "the moved secret", process)

    assert vault.read_raw("moved/watcher_1") == first  # the same verified key and secret
    assert vault.read_raw("monitoring/watcher_1") == first  # the old path left as it was
    keys = iam_admin.client().list_access_keys(UserName="watcher_1")["AccessKeyMetadata"]
    assert [k["AccessKeyId"] for k in keys] == [first["access_key_id"]]
    [moved] = logged(err, "secret_path_changed")
    assert moved["old_path"] == "monitoring/watcher_1" and moved["copied"] is True
    assert first["secret_access_key"] not in err.read_text()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


@pytest.mark.timeout(120)
def test_a_renamed_target_carries_its_keys_on_and_a_removed_one_is_warned_of(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, port, max_age="1h")
    err = tmp_path / "stderr.log"
    process = run_until_first_key(cfg, daemon_env, started, err, vault)
    key = vault.read_raw("monitoring/watcher_1")["access_key_id"]
    original = cfg.read_text()

    cfg.write_text(original.replace("- name: monitoring\n", "- name: monitor2\n"))
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: logged(err, "target_renamed"), 30, "the rename carried over", process)
    wait_for(
        lambda: any(e["target"] == "monitor2" for e in logged(err, "pass_summary")), 30, "a pass"
    )

    [renamed] = logged(err, "target_renamed")
    assert renamed["old_target"] == "monitoring" and renamed["keys"] == [key]
    [seen] = logged(err, "target_not_configured")  # at the reload, before the pass carried it on
    assert seen["target"] == "monitoring" and "carries this state on" in seen["note"]
    keys = iam_admin.client().list_access_keys(UserName="watcher_1")["AccessKeyMetadata"]
    assert [k["AccessKeyId"] for k in keys] == [key]  # no new key, nothing foreign
    assert vault.read_raw("rotator/targets/monitor2")["current"]["key_id"] == key
    assert vault.read_raw("rotator/targets/monitoring")["renamed_to"] == "monitor2"
    summary = [e for e in logged(err, "pass_summary") if e["target"] == "monitor2"][-1]
    assert summary["ok"] and summary["foreign_keys"] == 0 and not summary["rotated"]

    # removed: another target only; the state of monitor2 still tracks the key
    cfg.write_text(
        original.replace("- name: monitoring\n", "- name: other\n")
        .replace("user: watcher_1", "user: watcher_2")
        .replace("secret_path: monitoring/watcher_1", "secret_path: other/watcher_2")
    )
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: len(logged(err, "target_not_configured")) == 2, 30, "the warning", process)
    removed = logged(err, "target_not_configured")[-1]
    assert removed["target"] == "monitor2" and removed["current_key_id"] == key
    assert "no longer rotated nor retired" in removed["note"]
    assert scrape(port)["rotator_unconfigured_targets"] == 1
    status = run_rotator(cfg, daemon_env, "status", "--json")
    rows = {row["target"]: row for row in json.loads(status.stdout)}
    assert set(rows) == {"other", "monitor2"}, status.stdout + status.stderr
    assert f"not in the config; its state tracks {key} (current)" in rows["monitor2"]["error"]
    once = run_rotator(cfg, daemon_env, "run", "--once")
    warned = [
        json.loads(line) for line in once.stderr.splitlines() if "target_not_configured" in line
    ]
    assert [w["target"] for w in warned] == ["monitor2"], once.stderr
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


@pytest.mark.timeout(120)
def test_a_removed_target_is_warned_of_once_vault_answers_when_it_was_away_at_start(
    tmp_path: Path,
    iam_admin: servers.MotoAdmin,
    vault: Any,
    daemon_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    port = servers.free_port()
    cfg = write_config(tmp_path, iam_admin, vault, port, max_age="1h")
    once = run_rotator(cfg, daemon_env, "run", "--once")
    assert once.returncode == 0, once.stderr
    key = vault.read_raw("monitoring/watcher_1")["access_key_id"]
    # monitoring removed, another target added; Vault is not there when the daemon starts
    vault_port = servers.free_port()
    cfg.write_text(
        cfg.read_text()
        .replace("- name: monitoring\n", "- name: other\n")
        .replace("user: watcher_1", "user: watcher_2")
        .replace("secret_path: monitoring/watcher_1", "secret_path: other/watcher_2")
        .replace(vault.address, f"http://127.0.0.1:{vault_port}")
    )
    err = tmp_path / "stderr.log"
    process = start_daemon(cfg, daemon_env, started, err)
    wait_for(lambda: logged(err, "unconfigured_check_failed"), 30, "the failed listing", process)
    assert logged(err, "target_not_configured") == []

    proxy = VaultProxy(vault.address, port=vault_port)  # Vault back, at the configured address
    proxy.start()
    try:
        wait_for(lambda: vault.read_raw("other/watcher_2"), 30, "the new target's key", process)
        wait_for(lambda: logged(err, "target_not_configured"), 30, "the warning", process)
        passes = len(logged(err, "pass_summary"))
        wait_for(lambda: len(logged(err, "pass_summary")) >= passes + 3, 30, "more passes")
        [removed] = logged(err, "target_not_configured")  # once, not once a pass
        assert removed["target"] == "monitoring" and removed["current_key_id"] == key
        assert "no longer rotated nor retired" in removed["note"]
        assert scrape(port)["rotator_unconfigured_targets"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        proxy.stop()
