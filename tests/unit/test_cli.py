"""rotator.cli: exit codes and one-line errors, without servers (nothing listens where the
configs point: a pass fails at once, which is all these tests need)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator import cli, config, daemon, errors, log, model, rotation

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "CREDENTIALS_DIRECTORY", "ROTATOR_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:  # what log.configure added
        root.removeHandler(handler)
    root.setLevel(level)


def write_config(directory: Path, level: str = "info", **defaults: Any) -> Path:
    (directory / "token").write_text("a-vault-token\n")
    data = {
        "eim": {"endpoint": "http://127.0.0.1:9", "region": "us-east-1", "max_attempts": 1},
        "vault": {"address": "http://127.0.0.1:9", "auth": {"token_file": "token"}},
        "defaults": {"check_interval": "1m", "inactive_period": "1h", **defaults},
        "targets": [{"name": "t1", "user": "u1", "secret_path": "p/t1"}],
        "logging": {"format": "json", "level": level},
    }
    path = directory / "rotator.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_age", "99999999999d"), ("grace", "99999999999d"), ("max_keys", 10**23)],
)
def test_check_config_with_a_value_that_would_overflow_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: Any
) -> None:
    path = write_config(tmp_path, **{key: value})

    code = cli.main(["check-config", "-c", str(path)])

    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"rotator: config error: defaults.{key}: ")
    assert "at most" in err and "Traceback" not in err


def test_rotate_names_a_target_given_twice_once_and_runs_one_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)

    code = cli.main(["rotate", "-c", str(path), "t1", "t1"])

    out, _ = capsys.readouterr()
    assert code == cli.EXIT_FAILED  # nothing listens at the Vault address
    assert [line.split(":")[0] for line in out.splitlines()] == ["t1"]


def test_run_passes_gives_a_name_given_twice_one_pass(tmp_path: Path) -> None:
    runtime = daemon.build_runtime(config.load(write_config(tmp_path)), daemon.SystemClock())

    reports = daemon.run_passes(runtime, ["t1", "t1", "t1"], force=True)

    assert [r.target for r in reports] == ["t1"]


def _boom(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError(f"unexpected state\nwith aws_secret_access_key={SECRET} in it")


def test_an_unexpected_error_is_one_redacted_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path)
    monkeypatch.setattr(daemon, "target_specs", _boom)

    code = cli.main(["check-config", "-c", str(path)])

    out, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("rotator: internal error: RuntimeError: unexpected state with ")
    assert err.endswith(" in it (a bug: please report it with the debug log)\n")
    assert SECRET not in err and "Traceback" not in err


def test_an_unexpected_error_before_logging_is_set_up_is_one_line_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "load", _boom)

    code = cli.main(["check-config", "-c", str(tmp_path / "rotator.yaml")])

    out, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED
    assert out == "" and err.count("\n") == 1 and "internal error: RuntimeError" in err
    assert SECRET not in err


def test_an_unexpected_error_logs_its_redacted_traceback_at_debug_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, level="debug")
    monkeypatch.setattr(daemon, "target_specs", _boom)

    code = cli.main(["check-config", "-c", str(path)])

    _, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    [internal] = [e for e in events if e["event"] == "internal_error"]
    assert internal["level"] == "debug"
    assert "Traceback" in internal["exception"] and "_boom" in internal["exception"]
    assert SECRET not in err
    assert err.splitlines()[-1].startswith("rotator: internal error: RuntimeError: ")


def test_a_keyboard_interrupt_still_exits_1_quietly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "load", interrupted)

    assert cli.main(["check-config", "-c", str(tmp_path / "x.yaml")]) == cli.EXIT_FAILED
    assert capsys.readouterr().err == ""


def test_check_config_names_a_missing_ca_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["vault"]["ca_file"] = "/nonexistent.pem"
    path.write_text(yaml.safe_dump(data))

    code = cli.main(["check-config", "-c", str(path)])

    _, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE
    assert err.startswith("rotator: config error: vault.ca_file: /nonexistent.pem does not exist")
    assert err.count("\n") == 1


def test_check_config_skipping_secret_files_notes_the_unchecked_ca_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["vault"]["ca_file"] = "/nonexistent.pem"
    path.write_text(yaml.safe_dump(data))

    code = cli.main(["check-config", "--skip-secret-files", "-c", str(path)])

    assert code == cli.EXIT_OK
    assert "secret files not read" in capsys.readouterr().out


def test_a_missing_ca_file_fails_the_start_of_run_naming_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["vault"]["ca_file"] = "ca.pem"
    path.write_text(yaml.safe_dump(data))
    settings = config.load(path)

    with pytest.raises(errors.ConfigError) as info:
        daemon.build_runtime(settings, daemon.SystemClock())

    assert info.value.path == "vault.ca_file"
    assert str(tmp_path / "ca.pem") in info.value.message


def test_a_reload_that_fails_unexpectedly_keeps_the_running_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path)
    running = daemon.Daemon(str(path), config.load(path))
    before = running._runtime
    stream = io.StringIO()
    log.configure(format="json", level="info", stream=stream)

    def overflowing(*_args: Any) -> Any:
        raise OverflowError(f"Python int too large to convert to C int (token={SECRET})")

    with monkeypatch.context() as patch:
        patch.setattr(config, "load", overflowing)
        running._reload()
    with monkeypatch.context() as patch:
        patch.setattr(daemon, "build_runtime", overflowing)
        running._reload()

    assert running._runtime is before
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [e for e in events if e["event"] == "config_reload_failed"]
    assert len(failed) == 2
    assert all(e["level"] == "error" and "OverflowError" in e["error"] for e in failed)
    assert all(e["kept"] == "the running config" for e in failed)
    assert SECRET not in stream.getvalue()
    registry = running._metrics.registry
    errors_total = registry.get_sample_value(
        "rotator_errors_total", {"target": "", "component": "config"}
    )
    reloads = registry.get_sample_value("rotator_config_reloads_total", {"result": "failure"})
    assert errors_total == 2 and reloads == 2
    before.store.close()


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["status", "--jsn"], "usage: rotator status "),
        (["adopt", "t1", "AKIA", "extra"], "usage: rotator adopt "),
        (["run", "--onse"], "usage: rotator run "),
    ],
)
def test_an_unknown_argument_shows_the_usage_of_its_command(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)

    err = capsys.readouterr().err
    assert exited.value.code == cli.EXIT_USAGE
    assert err.startswith(usage), err
    assert f"unrecognized arguments: {argv[-1]}" in err


def test_check_config_notes_a_verify_timeout_that_leaves_one_attempt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = write_config(tmp_path, verify_timeout="5s")
    assert cli.main(["check-config", "-c", str(short)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "note: verify_timeout 5s (target t1) leaves one verification attempt" in out
    assert "the first retry comes 10s after it" in out

    enough = write_config(tmp_path, verify_timeout="10s")
    assert cli.main(["check-config", "-c", str(enough)]) == cli.EXIT_OK
    assert "verify_timeout" not in capsys.readouterr().out


def test_verify_attempts_counts_the_attempts_verify_timeout_leaves() -> None:
    def attempts(timeout: str) -> int:
        policy = rotation.Policy(
            max_age=timedelta(days=30),
            grace=timedelta(days=1),
            inactive_period=timedelta(days=3),
            check_interval=timedelta(minutes=5),
            verify_timeout=config.parse_duration(timeout),
        )
        return rotation.verify_attempts(policy)

    assert [attempts(t) for t in ("5s", "10s", "29s", "30s", "2m")] == [1, 2, 2, 3, 4]


@pytest.mark.parametrize(
    ("phase", "until", "cell"),
    [
        ("grace (Active)", "2026-12-04T10:00:08.5Z", "AKIAOLD (grace (Active), Inactive in 8s)"),
        ("Inactive", "2026-12-04T11:30:00Z", "AKIAOLD (Inactive, deleted in 1h30m)"),
        ("Inactive", "2026-12-04T09:59:00Z", "AKIAOLD (Inactive, deleted at the next pass)"),
        ("gone", None, "AKIAOLD (gone)"),
    ],
)
def test_the_status_table_says_when_a_retiring_key_moves_on_relative_to_now(
    phase: str, until: str | None, cell: str
) -> None:
    now = model.parse_time("2026-12-04T10:00:00Z")

    assert cli._retiring_cell({"key_id": "AKIAOLD", "phase": phase, "until": until}, now) == cell


@pytest.mark.parametrize(
    ("due", "cell"),
    [
        ("2026-12-04T15:12:00Z", "in 5h12m"),
        ("2026-12-04T10:00:00Z", "in 0s"),
        ("2026-12-04T09:59:31Z", "overdue 29s"),  # not "in -29s": the daemon is not passing
        (None, "-"),
    ],
)
def test_the_status_table_says_how_long_a_rotation_is_overdue(due: str | None, cell: str) -> None:
    now = model.parse_time("2026-12-04T10:00:00Z")

    assert cli._due_cell(due, now) == cell


def test_the_status_table_names_the_target_whose_state_tracks_a_foreign_key() -> None:
    class Engine:
        calls = 0

        def tracked_by(self, specs: Any) -> dict[str, str]:
            Engine.calls += 1
            return {"AKIAR1": "r1", "AKIAMINE": "r2"}

    runtime: Any = type("Runtime", (), {"engine": Engine(), "specs": {}})()
    rows: list[dict[str, Any]] = [
        {"target": "r2", "foreign_keys": ["AKIAR1", "AKIAHAND", "AKIAMINE"]},
        {"target": "r3", "foreign_keys": []},
    ]

    cli._name_foreign_owners(runtime, rows)

    assert rows[0]["foreign_tracked_by"] == {"AKIAR1": "r1"}  # its own state's key is no owner
    assert "foreign_tracked_by" not in rows[1]
    cells = [cli._foreign_cell(rows[0], k) for k in rows[0]["foreign_keys"]]
    assert cells == ["AKIAR1 (tracked by target r1)", "AKIAHAND", "AKIAMINE"]
    cli._name_foreign_owners(runtime, [{"target": "r3", "foreign_keys": []}])
    assert Engine.calls == 1  # no state is read when no row has a foreign key


def test_check_config_reads_the_kubernetes_token_file_as_run_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    jwt = tmp_path / "sa-token"
    data["vault"]["auth"] = {
        "method": "kubernetes",
        "kubernetes": {"role": "rotator", "token_file": str(jwt)},
    }
    path.write_text(yaml.safe_dump(data))

    missing = cli.main(["check-config", "-c", str(path)])
    _, err = capsys.readouterr()
    jwt.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n")
    found = cli.main(["check-config", "-c", str(path)])

    assert missing == cli.EXIT_USAGE
    assert err.startswith("rotator: config error: vault.auth.kubernetes.token_file:")
    assert "--skip-secret-files" in err and err.count("\n") == 1
    assert found == cli.EXIT_OK
    assert "eyJ" not in capsys.readouterr().out


def test_check_config_notes_auth_settings_the_method_does_not_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    secret_id = tmp_path / "secret-id"
    secret_id.write_text("a-secret-id\n")
    token = data["vault"]["auth"]["token_file"]
    data["vault"]["auth"] = {
        "method": "approle",
        "token_file": token,  # left from the token method
        "approle": {"role_id": "r-1", "secret_id_file": str(secret_id)},
        "kubernetes": {"role": "rotator", "token_file": token},
    }
    path.write_text(yaml.safe_dump(data))

    assert cli.main(["check-config", "-c", str(path)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "is set but not used" in line]

    assert notes == [
        "  note: vault.auth.token_file is set but not used: vault.auth.method is approle; "
        "remove it, or set the method that uses it",
        "  note: vault.auth.kubernetes is set but not used: vault.auth.method is approle; "
        "remove it, or set the method that uses it",
    ]
    assert "a-secret-id" not in out


def test_the_signal_handler_takes_no_lock_and_the_loop_sees_the_signals(tmp_path: Path) -> None:
    # The handler runs between two bytecodes of the main thread, which may hold a lock (an
    # Event's), and a second signal may interrupt the handler itself: any lock it took could
    # deadlock the daemon for good (Ctrl-C on `make demo` sends SIGINT and SIGTERM at once).
    path = write_config(tmp_path)
    running = daemon.Daemon(str(path), config.load(path))
    running._wake_r, running._wake_w = os.pipe()
    taken: list[str] = []

    locks = (type(threading.Lock()), type(threading.RLock()))

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), locks):
            taken.append(f"lock.{arg.__name__}")
        elif event == "call" and frame.f_code.co_filename == threading.__file__:
            taken.append(f"threading.{frame.f_code.co_qualname}")

    sys.setprofile(watch)
    try:
        running._on_signal(signal.SIGHUP, None)
        running._on_signal(signal.SIGTERM, None)
        running._on_signal(signal.SIGINT, None)
    finally:
        sys.setprofile(None)

    try:
        assert taken == []
        assert running._reload_requested and running._stop_requested
        assert not running._stop.is_set()  # the loop sets it, outside the handler
        running._wait_for_signal(5)  # returns at once: the bytes are there
        readable, _, _ = select.select([running._wake_r], [], [], 0)
        assert readable == []  # drained
    finally:
        os.close(running._wake_r)
        os.close(running._wake_w)
        running._runtime.store.close()


def test_check_config_outside_systemd_notes_a_credential_file_and_how_to_check_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["eim"]["credentials_file"] = "credential:eim-credentials"
    path.write_text(yaml.safe_dump(data))

    code = cli.main(["check-config", "-c", str(path)])

    out = capsys.readouterr().out
    assert code == cli.EXIT_OK
    assert "eim.credentials_file (credential:eim-credentials) is read only under systemd" in out
    assert "CREDENTIALS_DIRECTORY=/etc/rotator/secrets" in out


def test_a_vault_check_that_never_comes_back_makes_rotator_unready(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    running = daemon.Daemon(str(path), config.load(path))
    running._health.vault_ok, running._health.vault_reason = True, "ok"
    running._health.probing[1] = time.monotonic() - daemon.PROBE_STUCK_SECONDS + 5

    running._check_probe_stuck()
    still = running._ready()
    running._health.probing[1] = time.monotonic() - daemon.PROBE_STUCK_SECONDS - 1
    running._check_probe_stuck()
    ready, reason = running._ready()

    assert still == (True, "ok")  # not yet: a slow answer is not a hang
    assert not ready and "has not come back" in reason and "vault.address" in reason
    assert running._metrics.registry.get_sample_value("rotator_ready") == 0.0
    running._runtime.store.close()


def test_a_stop_whose_steps_never_end_ends_the_process_after_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path)
    running = daemon.Daemon(str(path), config.load(path))
    hung = threading.Event()

    class Scheduler:
        def shutdown(self, wait: bool) -> None:
            hung.wait(30)  # a job stuck in a call that never comes back

    exits: list[int] = []
    running._scheduler = Scheduler()
    monkeypatch.setattr(daemon, "STOP_WAIT_SECONDS", 0.2)
    monkeypatch.setattr(daemon.os, "_exit", exits.append)
    stream = io.StringIO()
    log.configure(format="json", level="info", stream=stream)

    running._shut_down_scheduler()
    hung.set()

    assert exits == [daemon.EXIT_STOP_TIMEOUT]
    assert '"event": "daemon_stop_timeout"' in stream.getvalue()
    running._runtime.store.close()


def test_a_pass_running_past_verify_timeout_plus_ten_minutes_is_said_stuck_once(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path)
    running = daemon.Daemon(str(path), config.load(path))
    spec = running._runtime.specs["t1"]
    running._metrics.init_target("t1")
    limit = spec.policy.verify_timeout.total_seconds() + daemon.PASS_STUCK_AFTER
    started = time.monotonic() - limit - 1
    running._running["t1"] = (started, spec)
    stream = io.StringIO()
    log.configure(format="json", level="info", stream=stream)

    running._check_passes_stuck()
    running._check_passes_stuck()  # said once per pass

    said = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in said] == ["pass_stuck"]
    assert said[0]["target"] == "t1" and said[0]["running_seconds"] >= limit
    registry = running._metrics.registry
    assert registry.get_sample_value("rotator_pass_stuck", {"target": "t1"}) == 1.0
    running._running["t1"] = (time.monotonic(), spec)  # a new pass, just begun
    running._check_passes_stuck()
    assert stream.getvalue().count("pass_stuck") == 1
    running._runtime.store.close()


def test_a_one_shot_pass_stuck_on_a_call_ends_with_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path)
    runtime = daemon.build_runtime(config.load(path), daemon.SystemClock())
    never = threading.Event()
    finished = model.PassReport(target="t2", ok=True, duration_seconds=0.1)

    class Engine:
        def run_pass(self, spec: Any, **_: Any) -> model.PassReport:
            if spec.name == "t1":
                never.wait(30)  # a server that answers a byte at a time
            return finished

    t1 = runtime.specs["t1"]
    t1 = dataclasses.replace(t1, policy=dataclasses.replace(t1.policy, verify_timeout=timedelta(0)))
    specs = {"t1": t1, "t2": dataclasses.replace(t1, name="t2")}
    stuck_runtime = dataclasses.replace(runtime, engine=Engine(), specs=specs)
    monkeypatch.setattr(daemon, "PASS_STUCK_AFTER", 0.2)
    monkeypatch.setattr(daemon, "HEARTBEAT_SECONDS", 0.05)

    try:
        with pytest.raises(daemon.PassStuck) as stuck:
            daemon.run_passes(stuck_runtime, ["t1", "t2"])
    finally:
        never.set()
        runtime.store.close()

    assert "target t1: its pass has waited" in str(stuck.value)
    assert "eim.endpoint, vault.address" in str(stuck.value)
    assert stuck.value.reports == [finished]  # what did finish is still told


def test_rotate_with_a_stuck_pass_tells_what_finished_and_ends_the_process_with_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    finished = model.PassReport(target="t2", ok=True, duration_seconds=0.1)

    def stuck(*_: Any, **__: Any) -> Any:
        raise daemon.PassStuck("t1", 700.0, [finished])

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(daemon, "run_passes", stuck)
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    with pytest.raises(SystemExit) as ended:
        cli.main(["rotate", "-c", str(path), "t1"])

    out, err = capsys.readouterr()
    assert ended.value.code == cli.EXIT_FAILED
    assert out.startswith("t2: ")
    assert err.startswith("rotator: target t1: its pass has waited 700s") and err.count("\n") == 1


def test_the_daemon_warns_of_the_mounts_settings_once_vault_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path)
    running = daemon.Daemon(str(path), config.load(path))
    store = running._runtime.store
    asked: list[int] = []
    monkeypatch.setattr(store, "refresh_token", lambda period: None)
    monkeypatch.setattr(store, "check", lambda: None)
    monkeypatch.setattr(store, "setup_warnings", lambda: asked.append(1) or ["mount says no"])
    stream = io.StringIO()
    log.configure(format="json", level="info", stream=stream)

    running._probe_vault()
    running._probe_vault()

    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    warned = [e["warning"] for e in events if e["event"] == "config_warning"]
    assert warned == ["mount says no"] and asked == [1]  # once per runtime
    assert running._ready() == (True, "ok")
    store.close()
