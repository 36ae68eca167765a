"""The long-running process: wiring, scheduling, signals, reload, health.

It turns settings into adapters and target specs, runs one APScheduler job per target at
``check_interval`` (spread in whole-second slots; the first pass at start), serves /metrics,
/healthz and /readyz, finishes the step in flight on SIGTERM/SIGINT and reloads the config on SIGHUP
(keeping the old one if the new one is invalid). The only importer of apscheduler.

This is one of the two places that catch broadly (per job): a failing job is logged with its
traceback, counted, and the other targets go on. A reload catches broadly too: whatever makes
it fail, the running config is kept and the failure logged and counted.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import math
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor as JobThreadPool
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

import rotator
from rotator import config, engine, errors, identity, log, metrics, model, rotation, systemd
from rotator.adapters import eim, vault

logger = structlog.get_logger("rotator.daemon")


class _SkippedRunFilter(logging.Filter):
    """A pass slower than check_interval makes APScheduler warn on every tick ("maximum number
    of running instances reached"): the job simply runs again when the pass ends, so say nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in record.getMessage()


logging.getLogger("apscheduler.scheduler").addFilter(_SkippedRunFilter())

HEARTBEAT_SECONDS = 5.0
VAULT_PROBE_SECONDS = 15.0  # readiness check and token renewal
EXIT_STOP_TIMEOUT = 1
PROBE_STUCK_SECONDS = 2 * VAULT_PROBE_SECONDS  # a check not back by then: unready
PASS_STUCK_AFTER = 600.0  # seconds past verify_timeout: a pass running longer is stuck
# How long a stop waits for the steps in flight. A call to a server that answers a byte at a
# time never times out, so the stop cannot wait for ever: the process then ends at once, which
# the protocol makes as safe as a kill -9 (each step is recorded before the next). Below
# systemd's TimeoutStopSec (2 min) and the pod's terminationGracePeriodSeconds (120 s).
STOP_WAIT_SECONDS = 90.0
HEALTHY_WITHIN_SECONDS = 30.0


class SystemClock:
    """Real time; ``wait`` returns early, with True, once a stop is requested."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self._stop = stop or threading.Event()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, seconds: float) -> bool:
        if seconds <= 0:
            return self._stop.is_set()
        return self._stop.wait(seconds)


# --- wiring ----------------------------------------------------------------------------------


# How far ahead a window is checked: every yearly pattern, and a 29 February seen from after it.
WINDOW_HORIZON = timedelta(days=366)
WINDOW_SAMPLES = 400  # starting points over the horizon: a few tens of milliseconds per window
WINDOW_OPENINGS_MEASURED = 5  # openings whose length is compared with check_interval


class RotationWindow:
    """A compiled ``rotation_window``: called with a time, "may a key be created at this
    minute?" (a minute matching the cron expression, in UTC), as the engine asks each pass."""

    def __init__(self, expression: str, key_path: str) -> None:
        try:
            self._trigger = CronTrigger.from_crontab(expression, timezone=UTC)
        except ValueError as exc:
            raise errors.ConfigError(
                key_path, f"invalid cron expression {expression!r}: {exc}"
            ) from None
        self.expression = expression
        self.key_path = key_path

    def __call__(self, now: datetime) -> bool:
        minute = _minute(now)
        fire: datetime | None = self._trigger.get_next_fire_time(None, minute)
        return fire == minute

    def next_opening(self, after: datetime) -> datetime | None:
        """The first minute at or after ``after`` the window is open; None: it never opens."""
        fire: datetime | None = self._trigger.get_next_fire_time(None, after.astimezone(UTC))
        return fire

    def open_minutes(self, opening: datetime, limit: int) -> int:
        """How many minutes the window stays open around the open minute ``opening``, counted
        up to ``limit``."""
        minutes = 1
        for direction in (1, -1):
            step = 1
            while minutes < limit and self(opening + timedelta(minutes=direction * step)):
                minutes += 1
                step += 1
        return minutes


def _minute(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(second=0, microsecond=0)


def rotation_window(expression: str | None, key_path: str) -> RotationWindow | None:
    """Compile a cron expression (UTC) into "may a key be created at this minute?"."""
    return None if expression is None else RotationWindow(expression, key_path)


def window_gap(
    window: RotationWindow, max_age: timedelta, now: datetime
) -> tuple[datetime, datetime | None] | None:
    """The first time in the coming year (``start``, the next opening after it) the window
    stays shut longer than ``max_age``: a key due then waits for that opening, so it outlives
    max_age by as much (for ever when the opening is None: '0 0 30 2 *'). Asked from starting
    points over WINDOW_HORIZON, with the runtime's trigger. None: it opens often enough."""
    step = max(max_age, WINDOW_HORIZON / WINDOW_SAMPLES)
    start = now
    while start < now + WINDOW_HORIZON:
        opening = window.next_opening(start)
        if opening is None or opening - start > max_age:
            return start, opening
        start += step
    return None


def check_window_opens(window: RotationWindow, now: datetime) -> None:
    """Refuse a window that never opens: keys would outlive max_age for ever. One that opens
    less often than max_age is a note (config_warnings): a business-hours window over a
    weekend may be just what the operator wants."""
    if window.next_opening(now) is None:
        raise errors.ConfigError(
            window.key_path,
            f"rotation_window '{window.expression}' never opens: no date matches it (such as "
            "30 February), so keys would outlive max_age for ever; fix the day and month "
            "fields, for example '* 8-17 * * mon-fri', or remove the key",
        )


def target_specs(settings: config.Settings, now: datetime | None = None) -> list[engine.TargetSpec]:
    """The engine's view of every configured target (also compiles the cron windows, and
    refuses one that never opens after ``now``, by default the current time)."""
    now = datetime.now(UTC) if now is None else now
    checked: set[str] = set()
    specs = []
    for index, target in enumerate(settings.targets):
        timing = target.timing
        window = rotation_window(
            timing.rotation_window,
            f"targets[{index}].rotation_window"
            if "rotation_window" in target.overrides
            else "defaults.rotation_window",
        )
        if window is not None and window.expression not in checked:
            check_window_opens(window, now)
            checked.add(window.expression)
        desired = None
        if target.group is not None:
            desired = identity.Desired(
                user=target.user,
                group=target.group,
                policy=None
                if target.policy is None
                else identity.WantedPolicy(
                    name=target.policy.name,
                    document=target.policy.document,
                    description=target.policy.description,
                    path=target.policy.path,
                ),
            )
        specs.append(
            engine.TargetSpec(
                name=target.name,
                user=target.user,
                secret_path=target.secret_path,
                policy=rotation.Policy(
                    max_age=timing.max_age,
                    grace=timing.grace,
                    inactive_period=timing.inactive_period,
                    check_interval=timing.check_interval,
                    max_keys=timing.max_keys,
                    verify_timeout=timing.verify_timeout,
                ),
                desired=desired,
                identity_check_interval=timing.identity_check_interval,
                window_open=window,
            )
        )
    return specs


def build_identity(settings: config.EimSettings) -> eim.EimIdentity:
    return eim.EimIdentity(
        region=settings.region,
        endpoint_url=settings.endpoint_url,
        # re-read before calls: a rotated credentials file is picked up without a restart
        credentials=None
        if settings.credentials_file is None
        else lambda: _required(config.read_eim_credentials(settings)),
        signing_name=settings.signing_name,
        connect_timeout=settings.connect_timeout.total_seconds(),
        read_timeout=settings.read_timeout.total_seconds(),
        max_attempts=settings.max_attempts,
        verify_action=settings.verify_action,
    )


def _required(credentials: tuple[str, model.Secret] | None) -> tuple[str, model.Secret]:
    assert credentials is not None  # credentials_file is set
    return credentials


def build_store(settings: config.VaultSettings) -> vault.VaultStore:
    """The Vault adapter. Secret files are re-read at each login (rotated files are picked up)
    and read once here too, so a missing or empty file fails at start, naming its key; so
    does a missing or unreadable ``ca_file``."""
    auth_settings = settings.auth
    auth: vault.TokenAuth | vault.AppRoleAuth | vault.KubernetesAuth
    source: Callable[[], model.Secret]
    if auth_settings.method == "approle":
        assert auth_settings.approle is not None
        secret_id_file = auth_settings.approle.secret_id_file
        source = lambda: config.read_secret_file(  # noqa: E731
            secret_id_file, "vault.auth.approle.secret_id_file"
        )
        auth = vault.AppRoleAuth(
            role_id=auth_settings.approle.role_id,
            secret_id=source,
            mount=auth_settings.approle.mount,
        )
    elif auth_settings.method == "kubernetes":
        assert auth_settings.kubernetes is not None
        jwt_file = auth_settings.kubernetes.token_file
        source = lambda: config.read_secret_file(  # noqa: E731
            jwt_file, "vault.auth.kubernetes.token_file"
        )
        auth = vault.KubernetesAuth(
            role=auth_settings.kubernetes.role, jwt=source, mount=auth_settings.kubernetes.mount
        )
    else:
        source = lambda: config.read_vault_token(settings)  # noqa: E731
        auth = vault.TokenAuth(
            source,
            origin=config.vault_token_origin(settings),
            fix=config.vault_token_fix(settings),
        )
    source()
    assert settings.address is not None
    return vault.VaultStore(
        address=settings.address,
        auth=auth,
        mount=settings.mount,
        state_path=settings.state_path,
        ca_file=None if settings.ca_file is None else str(config.check_ca_file(settings.ca_file)),
        namespace=settings.namespace,
        timeout=settings.timeout.total_seconds(),
    )


@dataclass
class Runtime:
    """Everything built from one version of the config."""

    settings: config.Settings
    specs: dict[str, engine.TargetSpec]
    engine: engine.Engine
    store: vault.VaultStore


def freeze_long_lived() -> None:
    """Move what exists now (config, clients, service models: a million objects) out of the
    garbage collector's reach; the full collections that passes trigger then scan only what the
    passes made, not the whole heap again. Called once the runtime is built, and after a reload
    (thawed first, so the replaced runtime's cycles are still collected)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def config_warnings(specs: Iterable[engine.TargetSpec], now: datetime | None = None) -> list[str]:
    """Settings that load but will likely not do what the operator wants (one line each)."""
    now = datetime.now(UTC) if now is None else now
    single: dict[timedelta, list[str]] = {}
    short: dict[tuple[str, int, timedelta], list[str]] = {}
    measured: dict[tuple[str, timedelta], int] = {}
    rare: dict[tuple[str, timedelta], list[str]] = {}
    gaps: dict[tuple[str, timedelta], tuple[datetime, datetime | None] | None] = {}
    for spec in specs:
        if rotation.verify_attempts(spec.policy) < 2:
            single.setdefault(spec.policy.verify_timeout, []).append(spec.name)
        window = spec.window_open
        if isinstance(window, RotationWindow):
            interval = spec.policy.check_interval
            if (window.expression, interval) not in measured:
                measured[window.expression, interval] = _shortest_opening(window, interval, now)
            minutes = measured[window.expression, interval]
            if timedelta(minutes=minutes) < interval:
                short.setdefault((window.expression, minutes, interval), []).append(spec.name)
            max_age = spec.policy.max_age
            if (window.expression, max_age) not in gaps:
                gaps[window.expression, max_age] = window_gap(window, max_age, now)
            if gaps[window.expression, max_age] is not None:
                rare.setdefault((window.expression, max_age), []).append(spec.name)
    notes = []
    for timeout, names in single.items():
        shown = _names(names)
        notes.append(
            f"verify_timeout {config.format_duration(timeout)} (target {shown}) leaves one "
            f"verification attempt: the first retry comes "
            f"{config.format_duration(rotation.VERIFY_FIRST_DELAY)} after it, so a new key IAM "
            "has not propagated yet is given up at once; use at least that (default 2m)"
        )
    for (expression, minutes, interval), names in short.items():
        notes.append(
            f"rotation_window '{expression}' (target {_names(names)}) opens for {minutes}m at a "
            f"time, less than check_interval {config.format_duration(interval)}: a key is made "
            "only by a pass inside an open minute, so passes may miss it and keys outlive "
            "max_age by days; open it for a range of minutes at least check_interval long "
            "(such as '0-9 3 * * *' for 03:00-03:09 rather than '0 3 * * *'), or shorten "
            "check_interval"
        )
    for (expression, max_age), names in rare.items():
        gap = gaps[expression, max_age]
        if gap is None or gap[1] is None:  # one that never opens was refused
            continue
        start, opening = gap
        notes.append(
            f"rotation_window '{expression}' (target {_names(names)}) does not open between "
            f"{start:%Y-%m-%d %H:%M} and {opening:%Y-%m-%d %H:%M} UTC, longer than max_age "
            f"{config.format_duration(max_age)}: a key due in between outlives max_age until "
            "then; if that is not meant, use a window that opens at least once every max_age "
            "or lengthen max_age"
        )
    return notes


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _shortest_opening(window: RotationWindow, interval: timedelta, now: datetime) -> int:
    """The shortest of the window's next few openings in minutes, counted up to
    ``interval`` (a longer one is long enough)."""
    limit = max(1, math.ceil(interval / timedelta(minutes=1)))
    shortest = limit
    start = now
    for _ in range(WINDOW_OPENINGS_MEASURED):
        opening = window.next_opening(start)
        if opening is None:
            break
        minutes = window.open_minutes(opening, limit)
        shortest = min(shortest, minutes)
        start = opening + timedelta(minutes=minutes + 1)
    return shortest


def moved_storage(old: config.Settings, new: config.Settings) -> list[str]:
    """What a reload changes that rotator cannot move: where the states are, and which IAM
    account the keys are in. Loaded as asked; said, since the targets start over there."""
    notes: list[str] = []
    where = ("address", "mount", "state_path")
    before = tuple(getattr(old.vault, name) for name in where)
    after = tuple(getattr(new.vault, name) for name in where)
    if before != after:
        notes.append(
            f"the states moved from {before[0]} {before[1]}/{before[2]} to {after[0]} "
            f"{after[1]}/{after[2]}: rotator does not move them, so each target starts over "
            "there and the keys its old state tracks count as foreign (retiring ones are not "
            "retired); copy the states to the new place, or adopt those keys"
        )
    if old.eim.endpoint_url != new.eim.endpoint_url:
        notes.append(
            f"eim endpoint changed from {old.eim.endpoint_url} to {new.eim.endpoint_url}: the "
            "keys the states track were made there; on another account they are not found, "
            "and are forgotten (still valid where they are): revert, or retire them by hand"
        )
    return notes


def build_runtime(
    settings: config.Settings,
    clock: SystemClock,
    *,
    dry_run: bool = False,
    one_shot: bool = False,
) -> Runtime:
    """The engine and its adapters; ``one_shot``: for a command that makes its passes and
    exits (a transient failure then says to run it again, not that a next pass retries it)."""
    specs = {spec.name: spec for spec in target_specs(settings)}
    for note in [*config.unused_settings(settings), *config_warnings(specs.values())]:
        logger.warning("config_warning", warning=note)
    iam = build_identity(settings.eim)
    store = build_store(settings.vault)
    worker = engine.Engine(
        iam,
        store,
        clock,
        dry_run=dry_run,
        lock=store,
        lock_ttl=settings.vault.lock_ttl.total_seconds(),
        configured=specs,
        retry_note=engine.RETRIED_BY_HAND if one_shot else engine.RETRIED_BY_THE_DAEMON,
    )
    return Runtime(settings, specs, worker, store)


def warn_unconfigured(found: Iterable[engine.UnconfiguredView]) -> None:
    """A warning per target the config no longer names whose state still tracks keys."""
    for view in found:
        logger.warning(
            "target_not_configured",
            target=view.target,
            user=view.user,
            current_key_id=view.current_key_id,
            retiring_key_ids=list(view.retiring_key_ids),
            pending_key_id=view.pending_key_id,
            note=view.fate,
        )


def run_passes(
    runtime: Runtime,
    names: Iterable[str],
    *,
    force: bool = False,
    check_identity: bool = False,
    lock_wait: float = 0.0,
    on_report: Callable[[model.PassReport], None] | None = None,
) -> list[model.PassReport]:
    """One pass over each named target, ``workers`` at a time; one failure never stops others.

    A name given twice gets one pass: two at once would race each other for the target's lock.
    """
    specs = [runtime.specs[name] for name in dict.fromkeys(names)]
    workers = max(1, min(runtime.settings.workers, len(specs)))
    started: dict[str, float] = {}

    def one(spec: engine.TargetSpec) -> model.PassReport:
        started[spec.name] = time.monotonic()
        return runtime.engine.run_pass(
            spec, force=force, check_identity=check_identity, lock_wait=lock_wait
        )

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pass")
    futures = {spec.name: pool.submit(one, spec) for spec in specs}
    waiting = set(futures.values())
    while waiting:
        _, waiting = wait(waiting, timeout=HEARTBEAT_SECONDS)
        now = time.monotonic()
        for spec in specs:
            begun = started.get(spec.name)
            limit = stuck_after(spec) + lock_wait
            if futures[spec.name] in waiting and begun is not None and now - begun > limit:
                pool.shutdown(wait=False, cancel_futures=True)  # its thread cannot be ended
                done = [f.result() for f in futures.values() if f.done() and not f.cancelled()]
                raise PassStuck(spec.name, now - begun, done)
    pool.shutdown()
    reports = [futures[spec.name].result() for spec in specs]
    if on_report is not None:
        for report in reports:
            on_report(report)
    return reports


def stuck_after(spec: engine.TargetSpec) -> float:
    """Seconds after which a pass over ``spec`` is stuck on a call that does not come back."""
    return spec.policy.verify_timeout.total_seconds() + PASS_STUCK_AFTER


class PassStuck(errors.RotatorError):
    """A pass of a one-shot command waits on a call that does not come back (a server that
    accepts but never answers, or answers a byte at a time: no per-read timeout ends it). The
    thread cannot be ended: the command has to end the process (as safe as a kill -9)."""

    component = "other"

    def __init__(self, target: str, waited: float, reports: list[model.PassReport]) -> None:
        self.reports = reports
        super().__init__(
            f"target {target}: its pass has waited {waited:.0f}s, longer than its verify_timeout "
            "plus 10 minutes, on a call to EIM or Vault that has not come back (a server that "
            "accepts but does not answer, or answers a byte at a time): check eim.endpoint, "
            "vault.address and the network in between. The command ends now; the next run "
            "resumes from the state in Vault"
        )


# --- the daemon ------------------------------------------------------------------------------


SPREAD_FRACTION = 0.1  # targets' passes are spread over 10 % of check_interval, 30 s at most
SPREAD_MAX_SECONDS = 30.0


class SlotTrigger(BaseTrigger):  # type: ignore[misc]  # apscheduler has no type hints
    """Every ``interval`` on a grid: ``phase + k * interval``, ``phase`` a whole second.

    Targets are spread over the first 10 % of the interval (30 s at most) in whole-second slots,
    each target keeping its slot, so the targets of one slot start together and the workers take
    them back to back. Passes started one at a time at random instants (APScheduler's jitter, as
    before) cost about a quarter more CPU each: a pass after a pause finds the caches cold
    (benchmarks/FINDINGS.md, finding 14). The calls per second, which OUTSCALE's throttling
    counts, are the same as with jitter over the same 10 %. The first pass after the start or a
    reload is at once (the job's ``next_run_time``); each next one is the first grid instant
    more than half an interval after the one before, so a whole interval after it on the grid.
    """

    def __init__(self, interval: float, phase: datetime) -> None:
        self.interval = timedelta(seconds=interval)
        self.phase = phase

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        after = (previous_fire_time + self.interval / 2) if previous_fire_time else now
        steps = math.floor((after - self.phase) / self.interval) + 1
        return self.phase + steps * self.interval

    def __str__(self) -> str:
        return f"every {self.interval.total_seconds():g}s from {self.phase.isoformat()}"


def slot_offsets(names: Iterable[str], interval_of: Callable[[str], float]) -> dict[str, int]:
    """Each target's slot, in whole seconds into its interval: the targets of one interval are
    dealt round the slots in name order (stable across restarts and reloads)."""
    dealt: dict[float, int] = {}
    offsets: dict[str, int] = {}
    for name in sorted(names):
        interval = interval_of(name)
        slots = max(1, int(min(interval * SPREAD_FRACTION, SPREAD_MAX_SECONDS)))
        index = dealt.get(interval, 0)
        dealt[interval] = index + 1
        offsets[name] = index % slots
    return offsets


@dataclass
class _Health:
    heartbeat: float = field(default_factory=time.monotonic)
    vault_ok: bool = False
    vault_reason: str = "Vault not checked yet"
    probing: dict[int, float] = field(default_factory=dict)  # thread -> when its check began


class Daemon:
    """`rotator run`: schedule passes until SIGTERM/SIGINT; reload on SIGHUP."""

    def __init__(self, config_path: str, settings: config.Settings) -> None:
        self._config_path = config_path
        self._stop = threading.Event()
        # Signals: the handler only sets these flags and writes a byte to the pipe; the main
        # loop, waiting on the pipe, does the rest. A handler must take no lock: it runs between
        # two bytecodes of the main thread, which may hold the very lock (an Event's, say),
        # and a second signal may interrupt the first handler.
        self._stop_requested = False
        self._reload_requested = False
        self._wake_r = self._wake_w = -1  # the pipe, made by run()
        self._running: dict[str, tuple[float, engine.TargetSpec]] = {}  # passes in flight
        self._said_stuck: set[tuple[str, float]] = set()  # (target, start) said pass_stuck
        self._setup_checked: Runtime | None = None  # whose Vault mount settings were checked
        # Fixed for the process's life: the pool's size and the listening address.
        self._workers = settings.workers
        self._listen = settings.metrics.listen
        self._clock = SystemClock(self._stop)
        self._metrics = metrics.Metrics()
        self._health = _Health()
        self._reporting = threading.Lock()  # one listing of the unconfigured states at a time
        self._reported: Runtime | None = None  # the runtime whose unconfigured states were told
        self._runtime = build_runtime(settings, self._clock)
        self._scheduler: Any = None
        self._server: metrics.MetricsServer | None = None
        self._notifier = systemd.Notifier.from_env()
        self._announced_ready = False

    # probes
    def _healthy(self) -> tuple[bool, str]:
        age = time.monotonic() - self._health.heartbeat
        if self._scheduler is None or age > HEALTHY_WITHIN_SECONDS:
            return False, f"scheduler heartbeat {age:.0f}s old"
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        return self._health.vault_ok, self._health.vault_reason

    def _probe_vault(self) -> None:
        me = threading.get_ident()
        self._health.probing[me] = time.monotonic()
        try:
            self._check_vault()
        finally:
            self._health.probing.pop(me, None)

    def _check_vault(self) -> None:
        store = self._runtime.store
        try:
            store.refresh_token(period=VAULT_PROBE_SECONDS)
        except errors.RotatorError as exc:
            # e.g. a static token near its max TTL: say so while it still works
            logger.warning("vault_token_not_refreshed", error=str(exc))
            self._metrics.record_error("", "vault")
        try:
            store.check()
        except errors.RotatorError as exc:
            if self._health.vault_ok or self._health.vault_reason != str(exc):
                logger.warning("vault_not_ready", error=str(exc))
            self._health.vault_ok, self._health.vault_reason = False, str(exc)
        else:
            if self._setup_checked is not self._runtime:  # once per runtime, Vault answering
                self._setup_checked = self._runtime
                with contextlib.suppress(errors.RotatorError):
                    for warning in store.setup_warnings():
                        logger.warning("config_warning", warning=warning)
            if not self._health.vault_ok:
                logger.info("vault_ready")
            self._health.vault_ok, self._health.vault_reason = True, "ok"
            if not self._announced_ready:  # systemd: config loaded and Vault auth works
                self._announced_ready = True
                self._notifier.ready(f"{len(self._runtime.specs)} targets")
        self._metrics.set_ready(self._health.vault_ok)

    def _beat(self) -> None:
        """The scheduler's heartbeat: /healthz and the systemd watchdog both follow it."""
        self._health.heartbeat = time.monotonic()
        self._notifier.watchdog()
        self._check_probe_stuck()
        self._check_passes_stuck()

    def _check_probe_stuck(self) -> None:
        """A Vault check that has not come back (a server that accepts and answers a byte at a
        time defeats every per-read timeout) makes rotator unready, as a failed one does."""
        started = list(self._health.probing.values())
        if not started:
            return
        waited = time.monotonic() - min(started)
        if waited < PROBE_STUCK_SECONDS:
            return
        reason = (
            f"the check of Vault has not come back for {waited:.0f}s: Vault, or something on "
            "the network in between, accepts requests but does not answer them in time; check "
            "its health and vault.address"
        )
        if self._health.vault_ok:
            logger.warning("vault_not_ready", error=reason)
            self._metrics.record_error("", "vault")
        self._health.vault_ok, self._health.vault_reason = False, reason
        self._metrics.set_ready(False)

    def _check_passes_stuck(self) -> None:
        """A pass running for longer than its verify_timeout plus PASS_STUCK_AFTER is stuck in
        a call that does not come back: said once (`pass_stuck`) and in rotator_pass_stuck."""
        now = time.monotonic()
        for name, (started, spec) in list(self._running.items()):
            limit = stuck_after(spec)
            if now - started < limit or (name, started) in self._said_stuck:
                continue
            self._said_stuck.add((name, started))
            self._metrics.set_stuck(name, True)
            logger.warning(
                "pass_stuck",
                target=name,
                running_seconds=round(now - started),
                note="the pass waits on a call to EIM or Vault that has not come back (a "
                "server that accepts but does not answer, or answers a byte at a time): check "
                "eim.endpoint, vault.address and the network in between; a restart ends the "
                "call, and the next pass resumes from the stored state",
            )

    # jobs
    def _job(self, name: str) -> None:
        runtime = self._runtime
        spec = runtime.specs.get(name)
        if spec is None:
            return
        started = time.monotonic()
        self._running[name] = (started, spec)
        try:
            self._pass(runtime, spec)
        finally:
            self._running.pop(name, None)
            if (name, started) in self._said_stuck:
                self._said_stuck.discard((name, started))
                self._metrics.set_stuck(name, False)

    def _pass(self, runtime: Runtime, spec: engine.TargetSpec) -> None:
        name = spec.name
        try:
            report = runtime.engine.run_pass(spec)
            self._metrics.record_pass(report, self._clock.now())
            if runtime is self._runtime:  # not reloaded meanwhile
                self._count_unconfigured(runtime, report)
            if "vault" in report.error_components:
                self._probe_vault()
        except Exception:  # the daemon must outlive any one target's bug
            logger.exception("job_crashed", target=name)
            self._metrics.record_error(name, "other")

    def _count_unconfigured(self, runtime: Runtime, report: model.PassReport) -> None:
        """After a pass: the gauge follows a rename's carry-over; the warnings Vault's absence
        kept from being said at start or at the reload are said once it answers."""
        if self._reported is not runtime:
            if "vault" not in report.error_components:
                self._report_unconfigured(runtime)
        elif (count := runtime.engine.unconfigured_count()) is not None:
            self._metrics.set_unconfigured(count)

    def _report_unconfigured(self, runtime: Runtime) -> None:
        """Warn of each target the config no longer names whose state still tracks keys, once
        a runtime (at start, after a reload, or after the first pass that finds Vault back if
        it was away then); a renamed target's first pass carries its state on."""
        with self._reporting:
            if self._reported is runtime:
                return  # another worker's pass did it meanwhile
            try:
                found = runtime.engine.unconfigured_view(runtime.specs.values())
            except errors.RotatorError as exc:  # Vault away: the passes look again
                logger.warning("unconfigured_check_failed", error=str(exc))
                return
            self._reported = runtime
        self._metrics.set_unconfigured(len(found))
        warn_unconfigured(found)

    def _schedule(self, runtime: Runtime) -> None:
        scheduler = self._scheduler
        for job in scheduler.get_jobs():
            if job.id.startswith("target:"):
                job.remove()
        now = datetime.now(UTC)
        base = now.replace(microsecond=0)  # one whole second: the targets of a slot fire together
        specs = runtime.specs

        def interval_of(name: str) -> float:
            return specs[name].policy.check_interval.total_seconds()

        offsets = slot_offsets(specs, interval_of)
        for spec in specs.values():
            self._metrics.init_target(spec.name)
            phase = base + timedelta(seconds=offsets[spec.name])
            scheduler.add_job(
                self._job,
                SlotTrigger(interval_of(spec.name), phase),
                args=[spec.name],
                id=f"target:{spec.name}",
                name=f"pass {spec.name}",
                next_run_time=now,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=None,
            )

    def _reload(self) -> None:
        old = self._runtime
        self._notifier.reloading("reloading the config")
        try:
            settings = config.load(self._config_path)
            runtime = build_runtime(settings, self._clock)
        except Exception as exc:  # a reload must never end the daemon: keep the running config
            if isinstance(exc, errors.ConfigError):
                logger.error("config_reload_failed", error=str(exc), kept="the running config")
            else:  # a bug: say so, with the traceback (the log pipeline redacts it)
                logger.error(
                    "config_reload_failed",
                    error=f"internal error: {type(exc).__name__}: {exc}",
                    kept="the running config",
                    exc_info=True,
                )
            self._metrics.record_error("", "config")
            self._metrics.record_reload(False)
            self._notifier.ready("config reload failed: kept the running config")
            return
        # What the running process was built with: a reload cannot change it (the scheduler's
        # pool and the listening socket exist once), so the running value stays, and says so.
        if settings.metrics.listen != self._listen:
            logger.warning(
                "metrics_listen_unchanged",
                reason="metrics.listen needs a restart",
                running=self._listen,
                configured=settings.metrics.listen,
            )
        for note in moved_storage(old.settings, settings):
            logger.warning("config_warning", warning=note)
        if settings.workers != self._workers:
            logger.warning(
                "workers_unchanged",
                reason="workers needs a restart",
                running=self._workers,
                configured=settings.workers,
            )
        log.configure(format=settings.logging.format, level=settings.logging.level)
        self._runtime = runtime
        for name in set(old.specs) - set(runtime.specs):
            self._metrics.forget_target(name)
        self._report_unconfigured(runtime)
        self._schedule(runtime)
        self._metrics.record_reload(True)
        self._probe_vault()
        old.store.close()
        del old
        freeze_long_lived()
        self._notifier.ready(f"{len(runtime.specs)} targets (config reloaded)")
        logger.info("config_reloaded", targets=len(runtime.specs))

    # signals
    def _shut_down_scheduler(self) -> None:
        """Let each job end at its next step boundary, for STOP_WAIT_SECONDS at most."""
        closer = threading.Thread(
            target=self._scheduler.shutdown, kwargs={"wait": True}, name="stop", daemon=True
        )
        closer.start()
        closer.join(STOP_WAIT_SECONDS)
        if not closer.is_alive():
            return
        logger.error(
            "daemon_stop_timeout",
            waited_seconds=STOP_WAIT_SECONDS,
            targets=sorted(self._running),  # whose passes are still in flight
            note="a call in flight has not come back (a server that accepts but does not answer "
            "in time): rotator ends now; the next start resumes from the stored state",
        )
        for handler in logging.getLogger().handlers:  # the log lines out before the end
            handler.flush()
        os._exit(EXIT_STOP_TIMEOUT)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requested = True
        self._wake_up()

    def _wake_up(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: the loop wakes up anyway
            os.write(self._wake_w, b"!")

    def _wait_for_signal(self, timeout: float) -> None:
        """Sleep until a signal's byte arrives or ``timeout`` passes, then drain the pipe."""
        readable, _, _ = select.select([self._wake_r], [], [], timeout)
        if readable:
            os.read(self._wake_r, 4096)

    def run(self) -> int:
        settings = self._runtime.settings
        self._metrics.set_build_info(rotator.__version__)
        try:
            self._server = self._metrics.serve(
                settings.metrics.host,
                settings.metrics.port,
                healthy=self._healthy,
                ready=self._ready,
            )
        except OSError as exc:
            taken = (
                " (is another rotator, or its demo, running?)"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise errors.ConfigError(
                "metrics.listen",
                f"cannot listen on {settings.metrics.listen}: {exc.strerror or exc}{taken}; "
                "stop what holds it, or choose a free address and port",
            ) from None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        # A SIGHUP while the process started (see rotator.entry.EarlyHangup) is a reload to do.
        if getattr(previous[signal.SIGHUP], "seen", False):
            self._reload_requested = True
        # Passes may take minutes (a key still propagating): the heartbeat and the Vault probe
        # get their own threads so that long passes never starve /healthz or the watchdog.
        self._scheduler = BackgroundScheduler(
            executors={
                "default": JobThreadPool(max_workers=self._workers),
                "control": JobThreadPool(max_workers=2),
            },
            timezone=UTC,
        )
        self._probe_vault()
        self._scheduler.add_job(
            self._beat,
            IntervalTrigger(seconds=HEARTBEAT_SECONDS),
            id="heartbeat",
            max_instances=1,
            coalesce=True,
            executor="control",
        )
        self._scheduler.add_job(
            self._probe_vault,
            IntervalTrigger(seconds=VAULT_PROBE_SECONDS),
            id="vault-probe",
            max_instances=1,
            coalesce=True,
            executor="control",
        )
        self._report_unconfigured(self._runtime)
        self._schedule(self._runtime)
        freeze_long_lived()
        self._scheduler.start()
        logger.info(
            "daemon_started",
            version=rotator.__version__,
            targets=len(self._runtime.specs),
            metrics=f"http://{settings.metrics.listen}/metrics",
            port=self._server.port,
            pid=os.getpid(),
        )
        try:
            while not self._stop_requested:
                if self._reload_requested:
                    self._reload_requested = False
                    self._reload()
                    continue  # a stop signalled during the reload goes first
                self._wait_for_signal(HEARTBEAT_SECONDS)
        finally:
            self._stop.set()  # the passes' waits end at their next step
            logger.info("daemon_stopping", reason="signal")
            self._notifier.stopping("finishing the steps in flight")
            self._shut_down_scheduler()
            self._server.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._runtime.store.close()
            self._notifier.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            logger.info("daemon_stopped")
        return 0
