"""Command line: argument parsing, output and exit codes; nothing else.

Exit codes: 0 success; 1 a target failed, is blocked, or a command could not do its job;
2 usage or configuration error (always one line naming the offending key, never a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

import rotator
from rotator import config, daemon, engine, errors, log, model

logger = structlog.get_logger("rotator.cli")

DEFAULT_CONFIG = "/etc/rotator/rotator.yaml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=None,
        help=f"config file (default: $ROTATOR_CONFIG, then {DEFAULT_CONFIG})",
    )
    parser = argparse.ArgumentParser(
        prog="rotator",
        description=(
            "Keeps OUTSCALE EIM (IAM) access keys short-lived: ensures the user, group and "
            "policy, rotates the user's key on schedule, verifies it, publishes it to Vault, "
            "and retires the old key through a grace period, Inactive, then deletion."
        ),
        epilog="Exit codes: 0 ok, 1 a target failed or is blocked, 2 usage or config error.",
    )
    parser.add_argument("--version", action="version", version=f"rotator {rotator.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run the daemon (or one pass with --once)",
        description=(
            "Run the daemon: a pass over each target every check_interval, metrics and probes "
            "on metrics.listen. SIGTERM/SIGINT finish the step in flight and exit 0; SIGHUP "
            "reloads the config (an invalid one is logged and the old one kept)."
        ),
        epilog="Exit: 0 stopped by a signal, or (--once) every target ok; 1 a target failed "
        "or is blocked (--once), or a step had not come back 90 s after the signal "
        "(daemon_stop_timeout: the next start resumes from the state); 2 config error.",
    )
    run.add_argument("--once", action="store_true", help="one pass over every target, then exit")
    run.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")

    rotate = sub.add_parser(
        "rotate",
        parents=[common],
        help="rotate targets now, whatever age",
        description="Create, verify and publish a new key for each TARGET now; the old key "
        "then retires through grace, Inactive and deletion as usual.",
        epilog="Exit: 0 rotated; 1 failed, blocked, or locked by another replica; 2 usage.",
    )
    rotate.add_argument("targets", nargs="+", metavar="TARGET", help="a target name")
    rotate.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")

    status = sub.add_parser(
        "status",
        parents=[common],
        help="show each target's keys and state",
        description="Per target: current key and age, next due time, retiring keys and their "
        "phase, pending key, foreign keys, last problem. Reads IAM and Vault, changes nothing.",
        epilog="Exit: 0 all fine; 1 a target has a problem or could not be read; 2 config.",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    check = sub.add_parser(
        "check-config",
        parents=[common],
        help="validate the config, touch nothing",
        description="Validate the config and read the secret files it names; contacts neither "
        "IAM nor Vault.",
        epilog="Exit: 0 valid; 2 invalid (one line naming the key).",
    )
    check.add_argument(
        "--skip-secret-files",
        action="store_true",
        help="do not read the secret files (a config meant for another machine or a pod)",
    )

    adopt = sub.add_parser(
        "adopt",
        parents=[common],
        help="hand a foreign key to rotator, which then retires it",
        description="Record KEY_ID, a key of TARGET's user that rotator did not create, as "
        "rotator's own and retiring: it stays Active for grace, then Inactive for "
        "inactive_period, then is deleted.",
        epilog="Exit: 0 adopted (or rotator's already); 1 no such key of that user, or IAM or "
        "Vault failed; 2 usage (unknown target) or config.",
    )
    adopt.add_argument("target", metavar="TARGET", help="the target whose user has the key")
    adopt.add_argument("key_id", metavar="KEY_ID", help="the foreign access key id")
    adopt.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    for command in sub.choices.values():  # so that main() can name the command's own usage
        command.set_defaults(command_parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = _parser().parse_known_args(argv)
    if unknown:  # argparse would print the top-level usage: give the command's instead
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    path = args.config or os.environ.get("ROTATOR_CONFIG") or DEFAULT_CONFIG
    try:
        settings = config.load(path)
        log.configure(format=settings.logging.format, level=settings.logging.level)
        specs = daemon.target_specs(settings)  # also compiles the rotation windows
        command = args.command
        if command == "check-config":
            unchecked = (
                ["secret files not read (--skip-secret-files)"]
                if args.skip_secret_files
                else _check_secret_files(settings)
            )
            names = ", ".join(s.name for s in specs)
            _out(f"{path}: OK, {len(specs)} target(s): {names}")
            notes = [*unchecked, *config.unused_settings(settings), *daemon.config_warnings(specs)]
            for note in notes:
                _out(f"  note: {note}")
            return EXIT_OK
        if command == "run" and not args.once and not args.dry_run:
            return daemon.Daemon(path, settings).run()
        dry_run = bool(getattr(args, "dry_run", False))
        runtime = daemon.build_runtime(
            settings, daemon.SystemClock(), dry_run=dry_run, one_shot=True
        )
        if command == "run":
            code = _passes(runtime, list(runtime.specs), force=False)
            with contextlib.suppress(errors.RotatorError):  # Vault away: the passes said so
                daemon.warn_unconfigured(runtime.engine.unconfigured_view(runtime.specs.values()))
                # what the daemon says once Vault answers (max_versions, delete_version_after):
                # a run --once from cron is the whole deployment
                for warning in runtime.store.setup_warnings():
                    logger.warning("config_warning", warning=warning)
            return code
        if command == "rotate":
            targets = list(dict.fromkeys(args.targets))  # one pass per target, even if named twice
            _check_targets(targets, runtime)
            # a replica working on the target holds its lease: wait up to two leases for it
            wait = 2 * settings.vault.lock_ttl.total_seconds()
            return _passes(runtime, targets, force=True, lock_wait=wait)
        if command == "status":
            return _status(runtime, as_json=args.json)
        if command == "adopt":
            _check_targets([args.target], runtime)
            spec = runtime.specs[args.target]
            wait = 2 * settings.vault.lock_ttl.total_seconds()  # as rotate: a pass may hold it
            _out(
                runtime.engine.adopt(
                    spec, args.key_id, others=runtime.specs.values(), lock_wait=wait
                )
            )
            return EXIT_OK
    except errors.ConfigError as exc:
        print(f"rotator: config error: {log.redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"rotator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.RotatorError as exc:
        print(f"rotator: {log.redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as exc:  # the last resort: a bug gets one line, never a traceback
        return _internal_error(exc)
    raise AssertionError(f"unhandled command {args.command}")  # argparse limits the choices


def _out(text: str) -> None:
    """What a command prints, redacted as the log is: what it shows comes from Vault and IAM,
    where a hand edit can put a secret in a field meant for an id."""
    print(log.redact(text))


def _internal_error(exc: Exception) -> int:
    # The traceback goes to the log at debug level (logging.level: debug shows it, redacted);
    # before the config is loaded no log is set up and structlog's default would print it.
    if structlog.is_configured():
        logger.debug("internal_error", exc_info=exc)
    message = log.redact(" ".join(f"{type(exc).__name__}: {exc}".split()))
    print(
        f"rotator: internal error: {message} (a bug: please report it with the debug log)",
        file=sys.stderr,
    )
    return EXIT_FAILED


class UsageError(errors.RotatorError):
    """The command line names something the config does not have."""


def _check_targets(names: Sequence[str], runtime: daemon.Runtime) -> None:
    unknown = [n for n in names if n not in runtime.specs]
    if unknown:
        known = ", ".join(runtime.specs) or "none"
        raise UsageError(f"unknown target {', '.join(unknown)}: configured targets are {known}")


def _check_secret_files(settings: config.Settings) -> list[str]:
    """Read every secret file the config names (never printing them), as `run` would, and
    check the CA bundle (``vault.ca_file``), which is also read only where it is used.

    ``credential:NAME`` files exist only inside the systemd unit: outside it they are noted,
    not failed. Returns those notes.
    """
    notes = []
    vault_auth = settings.vault.auth
    readers: list[tuple[str, object, Callable[[], object]]] = [
        (
            "eim.credentials_file",
            settings.eim.credentials_file,
            lambda: config.read_eim_credentials(settings.eim),
        ),
    ]
    if vault_auth.method == "token":
        readers.append(
            (
                "vault.auth.token_file",
                vault_auth.token_file,
                lambda: config.read_vault_token(settings.vault),
            )
        )
    elif vault_auth.method == "approle" and vault_auth.approle is not None:
        secret_id_file = vault_auth.approle.secret_id_file
        readers.append(
            (
                "vault.auth.approle.secret_id_file",
                secret_id_file,
                lambda: config.read_secret_file(
                    secret_id_file, "vault.auth.approle.secret_id_file"
                ),
            )
        )
    elif vault_auth.method == "kubernetes" and vault_auth.kubernetes is not None:
        jwt_file = vault_auth.kubernetes.token_file
        readers.append(
            (
                "vault.auth.kubernetes.token_file",
                jwt_file,
                lambda: config.read_secret_file(jwt_file, "vault.auth.kubernetes.token_file"),
            )
        )
    ca_file = settings.vault.ca_file
    if ca_file is not None:
        readers.append(("vault.ca_file", ca_file, lambda: config.check_ca_file(ca_file)))
    for key, value, read in readers:
        if str(value or "").startswith("credential:") and not os.environ.get(
            "CREDENTIALS_DIRECTORY"
        ):
            notes.append(
                f"{key} ({value}) is read only under systemd (LoadCredential=), so not checked "
                "here: to check it on the host, run this command as root with "
                "CREDENTIALS_DIRECTORY=/etc/rotator/secrets (where deploy/README.md puts them)"
            )
            continue
        try:
            read()
        except errors.ConfigError as exc:
            raise errors.ConfigError(
                exc.path,
                f"{exc.message} (for a config meant for another machine or a pod, "
                "--skip-secret-files checks the rest)",
            ) from None
    return notes


def _passes(
    runtime: daemon.Runtime, names: list[str], *, force: bool, lock_wait: float = 0.0
) -> int:
    # `rotate` (force) also checks the identity, as an operator acting by hand would expect
    try:
        reports = daemon.run_passes(
            runtime, names, force=force, check_identity=force, lock_wait=lock_wait
        )
    except daemon.PassStuck as stuck:
        for report in stuck.reports:
            _out(_summary(report))
        print(f"rotator: {log.redact(str(stuck))}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILED)  # the stuck thread would keep the interpreter from exiting
    for report in reports:
        _out(_summary(report))
        if report.dry_run:
            for action in report.actions or ("nothing to do",):
                _out(f"  - {action}")
    if force and any(r.skipped for r in reports):
        return EXIT_FAILED  # `rotate` could not rotate a target another replica kept busy
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED


def _summary(report: model.PassReport) -> str:
    if report.skipped:
        verdict = f"skipped: {report.skipped}"
    elif report.dry_run:
        verdict = "plan"
    elif report.blocked:
        verdict = f"BLOCKED: {report.blocked_reason}"
    elif not report.ok:
        verdict = f"FAILED: {report.error}"
    elif report.rotated:
        verdict = f"rotated, published {report.published_key_id}"
    else:
        verdict = f"ok, published {report.published_key_id or '-'}"
    return f"{report.target}: {verdict}"


def _age(delta: timedelta | None) -> str:
    """A short human duration: 3d4h, 5h12m, 4m30s, 12s (negative: overdue)."""
    if delta is None:
        return "-"
    seconds = int(delta.total_seconds())
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for index, (unit, size) in enumerate(units[:-1]):
        if seconds >= size:
            small_unit, small_size = units[index + 1]
            rest = (seconds % size) // small_size
            return f"{sign}{seconds // size}{unit}" + (f"{rest}{small_unit}" if rest else "")
    return f"{sign}{seconds}s"


def _time(value: datetime | None) -> str | None:
    return None if value is None else model.format_time(value)


def _status(runtime: daemon.Runtime, *, as_json: bool) -> int:
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    failed = False
    for spec in runtime.specs.values():
        try:
            view = runtime.engine.status(spec)
        except errors.RotatorError as exc:
            failed = True
            rows.append({"target": spec.name, "error": log.redact(str(exc))})
            continue
        failed = failed or view.blocked is not None or view.last_error is not None
        rows.append(_status_row(view, now))
    _name_foreign_owners(runtime, rows)
    rows.extend(_unconfigured_rows(runtime))  # said, but not a failure: a removal is deliberate
    if as_json:
        _out(json.dumps(rows, indent=2))
    else:
        _out(_table(rows))
    return EXIT_FAILED if failed else EXIT_OK


def _name_foreign_owners(runtime: daemon.Runtime, rows: list[dict[str, Any]]) -> None:
    """A key foreign to its target that another target's state tracks (a name reused after a
    rename) is that target's: the row names it, in ``foreign_tracked_by``. The states are
    read once, and only when some row has foreign keys."""
    if not any(row.get("foreign_keys") for row in rows):
        return
    try:
        owners = runtime.engine.tracked_by(runtime.specs.values())
    except errors.RotatorError:
        return  # Vault away: the rows say so
    for row in rows:
        tracked = {
            key_id: owners[key_id]
            for key_id in row.get("foreign_keys", ())
            if owners.get(key_id, row["target"]) != row["target"]
        }
        if tracked:
            row["foreign_tracked_by"] = tracked


def _unconfigured_rows(runtime: daemon.Runtime) -> list[dict[str, Any]]:
    """A row per target the config no longer names whose state still tracks keys."""
    try:
        found = runtime.engine.unconfigured_view(runtime.specs.values())
    except errors.RotatorError:
        return []  # Vault away: the configured targets' rows say so
    return [
        {
            "target": view.target,
            "error": f"not in the config; its state tracks {', '.join(view.keys()) or 'no key'} "
            f"of user {view.user}: {view.fate}",
        }
        for view in found
    ]


def _status_row(view: engine.StatusView, now: datetime) -> dict[str, Any]:
    return {
        "target": view.target,
        "user": view.user,
        "secret_path": view.secret_path,
        "published_key_id": view.published_key_id,
        "current_key_id": view.current_key_id,
        "current_key_age_seconds": None
        if view.current_created is None
        else int((now - view.current_created).total_seconds()),
        "next_due": _time(view.next_due),
        "due_now": view.due_reason,
        "pending_key_id": view.pending_key_id,
        "retiring": [
            {"key_id": key_id, "phase": phase.value, "until": _time(until)}
            for key_id, phase, until in view.retiring
        ],
        "foreign_keys": list(view.foreign),
        "keys": [
            {"key_id": k.key_id, "status": k.status.value, "created": _time(k.created)}
            for k in view.keys
        ],
        "blocked": view.blocked,
        "last_error": view.last_error,
        "last_rotation_at": _time(view.last_rotation_at),
        "failures": view.failures,
    }


def _retiring_cell(retiring: dict[str, Any], now: datetime) -> str:
    """``AKIA... (grace (Active), Inactive in 8s)``: the exact times are in --json."""
    phase, until = retiring["phase"], retiring["until"]
    if until is None:
        return f"{retiring['key_id']} ({phase})"
    left = model.parse_time(until) - now
    step = engine.RetiringPhase(phase).next_step or "next step"
    when = f"in {_age(left)}" if left > timedelta(0) else "at the next pass"
    return f"{retiring['key_id']} ({phase}, {step} {when})"


def _foreign_cell(row: dict[str, Any], key_id: str) -> str:
    owner = row.get("foreign_tracked_by", {}).get(key_id)
    return key_id if owner is None else f"{key_id} (tracked by target {owner})"


def _due_cell(due: str | None, now: datetime) -> str:
    """When the next rotation is due: "in 5h12m", or "overdue 29s" (the daemon not passing)."""
    if due is None:
        return "-"
    left = model.parse_time(due) - now
    return f"in {_age(left)}" if left >= timedelta(0) else f"overdue {_age(-left)}"


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        "TARGET",
        "CURRENT KEY",
        "AGE",
        "NEXT DUE",
        "RETIRING",
        "PENDING",
        "FOREIGN",
        "PROBLEM",
    )
    lines = [header]
    now = datetime.now(UTC)
    for row in rows:
        if "error" in row:
            lines.append((row["target"], "-", "-", "-", "-", "-", "-", row["error"]))
            continue
        age = row["current_key_age_seconds"]
        due = row["next_due"]
        retiring = ", ".join(_retiring_cell(r, now) for r in row["retiring"])
        lines.append(
            (
                row["target"],
                row["current_key_id"] or "-",
                "-" if age is None else _age(timedelta(seconds=age)),
                "now" if row["due_now"] else _due_cell(due, now),
                retiring or "-",
                row["pending_key_id"] or "-",
                ", ".join(_foreign_cell(row, key_id) for key_id in row["foreign_keys"]) or "-",
                row["blocked"] or row["last_error"] or "-",
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  "
        + str(line[-1])
        for line in lines
    )
