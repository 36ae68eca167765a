"""Every Prometheus metric rotator exports, and the small HTTP server for /metrics and probes.

The only module that imports ``prometheus_client``. Metrics live on an injected
``CollectorRegistry`` (a fresh one by default, never the process-global registry) so tests can
read values with ``registry.get_sample_value`` without sharing state.

Labels are bounded and fixed: ``target`` (a configured target name), ``result``, ``status``,
``component``, ``version``. This module must never put a key id, a secret, an error message or any
other unbounded value into a label.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final, TypeAlias
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from rotator import model

_log = logging.getLogger(__name__)

# The *_created series would double the output; no rule or dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

ROTATION_RESULTS: Final = ("success", "failure")
KEY_STATUSES: Final = ("active", "inactive")
COMPONENTS: Final = ("eim", "vault", "verify", "lock", "config")
OTHER_COMPONENT: Final = "other"  # anything outside COMPONENTS, so the label stays bounded
RELOAD_RESULTS: Final = ("success", "failure")
GLOBAL_TARGET: Final = ""  # the target label of errors that belong to no target (config reload)

# 10 ms .. 10 min: a pass with nothing to do takes tens of milliseconds, one that waits for a new
# key to propagate can take minutes (verify_timeout defaults to 2m, plus retries).
PASS_DURATION_BUCKETS: Final = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

Probe: TypeAlias = Callable[[], bool | tuple[bool, str]]
"""A health or readiness check: ``True``/``False``, or ``(ok, reason)`` to explain a 503."""


_ERROR_COMPONENTS: Final = (*COMPONENTS, OTHER_COMPONENT)
_BUCKET_LABELS: Final = (
    *(floatToGoString(b) for b in PASS_DURATION_BUCKETS),  # type: ignore[no-untyped-call]
    "+Inf",
)


@dataclass(slots=True)
class _Series:
    """One target's values: a few dozen numbers, not a prometheus_client object per series
    (which costs about 9 KB a target, 9 MB for a fleet of 1000)."""

    rotations: list[float] = field(default_factory=lambda: [0.0] * len(ROTATION_RESULTS))
    errors: list[float] = field(default_factory=lambda: [0.0] * len(_ERROR_COMPONENTS))
    # observations per bucket (not cumulative), the last one for +Inf
    buckets: list[float] = field(default_factory=lambda: [0.0] * (len(PASS_DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    keys: list[float] = field(default_factory=lambda: [0.0] * len(KEY_STATUSES))
    foreign: float = 0.0
    blocked: float = 0.0
    stuck: float = 0.0
    # gauges whose zero would be a lie (timestamps, the key age): absent until a pass sets them
    last_rotation: float | None = None
    last_pass_success: float | None = None
    key_age: float | None = None
    next_rotation: float | None = None


class _TargetCollector(Collector):
    """Exposes every target's ``_Series`` at scrape time (prometheus_client's custom collector
    pattern, for label sets as many as the fleet).

    /metrics does not go through :meth:`collect`: :meth:`exposition` keeps each target's sample
    lines as prometheus_client's own encoder wrote them, per format, and writes them again only
    after that target changed. A scrape of 1000 targets then costs a join instead of encoding
    34 000 samples (0.5 s of CPU in the text format, 0.8 s in OpenMetrics, which Prometheus asks
    for first).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.series: dict[str, _Series] = {}
        self.global_errors: dict[str, float] = {"config": 0.0}  # target "": no target
        # format (the content type) -> target -> that target's sample lines, one string per
        # family; a target's entries are dropped (by ``changed``) whenever its series change.
        # The formats are bounded: an Accept header may name any version.
        self._lines: dict[str, dict[str, list[str]]] = {}
        self._version: dict[str, int] = {}  # target -> changes so far
        self._hidden = threading.local()

    def changed(self, target: str) -> None:
        """Called under ``lock`` after ``target``'s series changed (or it was removed)."""
        self._version[target] = self._version.get(target, 0) + 1
        for cache in self._lines.values():
            cache.pop(target, None)

    def collect(self) -> Iterator[Metric]:
        if getattr(self._hidden, "on", False):
            return  # exposition() writes these families itself
        with self.lock:
            items = [(target, _copy(series)) for target, series in self.series.items()]
            global_errors = dict(self.global_errors)
        yield from _families(items, global_errors)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no duplicate-name check against the registry's other metrics needed

    @contextlib.contextmanager
    def hidden(self) -> Iterator[None]:
        """While the registry's other collectors are encoded in this thread, yield nothing."""
        self._hidden.on = True
        try:
            yield
        finally:
            self._hidden.on = False

    def exposition(self, encoder: Encoder, content_type: str) -> list[str]:
        """Every family of this collector in ``encoder``'s format, each with its header;
        ``content_type`` names the format (prometheus_client makes a new encoder per call)."""
        with self.lock:
            global_errors = dict(self.global_errors)
            cache = self._lines.get(content_type)
            if cache is None:
                while len(self._lines) >= _FORMATS_KEPT:
                    del self._lines[next(iter(self._lines))]
                cache = self._lines[content_type] = {}
            # each target's lines as they are now, or a copy of its series to write them from
            have = {target: cache.get(target) for target in self.series}
            stale = [
                (t, _copy(self.series[t]), self._version.get(t, 0))
                for t, v in have.items()
                if v is None
            ]
        for target, series, version in stale:
            have[target] = lines = _blocks(encoder, _families([(target, series)], {}))
            with self.lock:
                if target in self.series and self._version.get(target, 0) == version:
                    cache[target] = lines  # unchanged since the copy: good until it changes
        out: list[str] = []
        # one encoding gives every family's header and the target-less samples (global errors)
        for index, (header, samples) in enumerate(_split(encoder, _families([], global_errors))):
            out.append(header)
            out.append(samples)
            out.extend(lines[index] for lines in have.values() if lines is not None)
        return out


Encoder: TypeAlias = Callable[[Collector], bytes]


def _families(items: list[tuple[str, _Series]], global_errors: dict[str, float]) -> list[Metric]:
    """The collector's families, always the same ones in the same order, for ``items``."""
    rotations = CounterMetricFamily(
        "rotator_rotations",
        "Rotations attempted, by result (the first key issued for a target counts).",
        labels=["target", "result"],
    )
    errors = CounterMetricFamily(
        "rotator_errors",
        "Errors by component (eim, vault, verify, lock, config, other).",
        labels=["target", "component"],
    )
    durations = HistogramMetricFamily(
        "rotator_pass_duration_seconds",
        "Duration of one pass over one target.",
        labels=["target"],
    )
    gauges = {name: GaugeMetricFamily(name, doc, labels=labels) for name, doc, labels in _GAUGES}
    for component, value in global_errors.items():
        errors.add_metric([GLOBAL_TARGET, component], value)
    for target, series in items:
        for result, value in zip(ROTATION_RESULTS, series.rotations, strict=True):
            rotations.add_metric([target, result], value)
        for component, value in zip(_ERROR_COMPONENTS, series.errors, strict=True):
            errors.add_metric([target, component], value)
        cumulative, running = [], 0.0
        for label, count in zip(_BUCKET_LABELS, series.buckets, strict=True):
            running += count
            cumulative.append((label, running))
        durations.add_metric([target], cumulative, sum_value=series.duration_sum)
        for status, value in zip(KEY_STATUSES, series.keys, strict=True):
            gauges["rotator_access_keys"].add_metric([target, status], value)
        gauges["rotator_foreign_keys"].add_metric([target], series.foreign)
        gauges["rotator_blocked"].add_metric([target], series.blocked)
        gauges["rotator_pass_stuck"].add_metric([target], series.stuck)
        for name, maybe in (
            ("rotator_last_rotation_timestamp_seconds", series.last_rotation),
            ("rotator_last_pass_success_timestamp_seconds", series.last_pass_success),
            ("rotator_key_age_seconds", series.key_age),
            ("rotator_next_rotation_timestamp_seconds", series.next_rotation),
        ):
            if maybe is not None:
                gauges[name].add_metric([target], maybe)
    return [rotations, *gauges.values(), errors, durations]


class _Families(Collector):
    """A registry-shaped holder of ready families, for prometheus_client's encoders."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _split(encoder: Encoder, families: list[Metric]) -> list[tuple[str, str]]:
    """``encoder``'s output for ``families`` as (header lines, sample lines) per family.

    Both encoders write each family as ``# HELP``, then ``# TYPE`` (and ``# UNIT``), then its
    samples; OpenMetrics ends the whole with ``# EOF``."""
    text = encoder(_Families(families)).decode()
    blocks: list[tuple[str, str]] = []
    for chunk in text.split("# HELP ")[1:]:
        lines = ("# HELP " + chunk).splitlines(keepends=True)
        header = "".join(x for x in lines if x.startswith("#") and x != "# EOF\n")
        samples = "".join(x for x in lines if not x.startswith("#"))
        blocks.append((header, samples))
    assert len(blocks) == len(families), "every family starts with # HELP"
    return blocks


def _blocks(encoder: Encoder, families: list[Metric]) -> list[str]:
    return [samples for _, samples in _split(encoder, families)]


_FORMATS_KEPT: Final = 4  # text 0.0.4, OpenMetrics 1.0.0, and a couple of variants


_GAUGES: Final = (
    (
        "rotator_last_rotation_timestamp_seconds",
        "Unix time of the last successful rotation.",
        ["target"],
    ),
    (
        "rotator_last_pass_success_timestamp_seconds",
        "Unix time of the last pass that ended without error.",
        ["target"],
    ),
    ("rotator_key_age_seconds", "Age of the published access key at the last pass.", ["target"]),
    (
        "rotator_next_rotation_timestamp_seconds",
        "Unix time when the next rotation is due: the current key reaches max_age (a backoff "
        "after failed rotations does not move it).",
        ["target"],
    ),
    (
        "rotator_access_keys",
        "Access keys the target's user has in IAM, by status (active, inactive).",
        ["target", "status"],
    ),
    (
        "rotator_foreign_keys",
        "Access keys of the target's user that this rotator did not create.",
        ["target"],
    ),
    (
        "rotator_blocked",
        "1 when a due rotation cannot proceed (no free key slot, ...), else 0.",
        ["target"],
    ),
    (
        "rotator_pass_stuck",
        "1 while a pass over the target has run for longer than its verify_timeout plus 10 "
        "minutes (a call that does not come back), else 0.",
        ["target"],
    ),
)


def _copy(series: _Series) -> _Series:
    return _Series(
        rotations=list(series.rotations),
        errors=list(series.errors),
        buckets=list(series.buckets),
        duration_sum=series.duration_sum,
        keys=list(series.keys),
        foreign=series.foreign,
        blocked=series.blocked,
        stuck=series.stuck,
        last_rotation=series.last_rotation,
        last_pass_success=series.last_pass_success,
        key_age=series.key_age,
        next_rotation=series.next_rotation,
    )


class Metrics:
    """rotator's metrics (DESIGN.md section 4) on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._targets = _TargetCollector()
        reg.register(self._targets)
        self._gone: set[str] = set()  # targets a reload dropped (guarded by _targets.lock)
        self.build_info = Gauge(
            "rotator_build_info",
            "Always 1; the version label says which rotator runs.",
            ["version"],
            registry=reg,
        )
        self.ready = Gauge(
            "rotator_ready",
            "1 when the config is loaded and Vault authentication works (what /readyz says).",
            registry=reg,
        )
        self.unconfigured = Gauge(
            "rotator_unconfigured_targets",
            "States in Vault of targets the config does not name that still track keys "
            "(a target removed from the config): their keys are no longer rotated nor retired.",
            registry=reg,
        )
        self.config_reloads = Counter(
            "rotator_config_reloads_total",
            "Configuration reloads (SIGHUP), by result; a failed reload keeps the old config.",
            ["result"],
            registry=reg,
        )
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result=result)

    # --- per target -----------------------------------------------------------------------

    def init_target(self, target: str) -> None:
        """Create the target's counter and histogram series at 0 so ``rate()`` works from start.

        Gauges whose zero would be a lie (timestamps, the key age) stay absent until a pass
        reports them; the counts (keys, foreign keys, blocked) start at 0.
        """
        with self._targets.lock:
            self._gone.discard(target)
            if target not in self._targets.series:
                self._targets.series[target] = _Series()
                self._targets.changed(target)

    def forget_target(self, target: str) -> None:
        """Remove every series of ``target`` (a config reload dropped it). A pass of it still
        in flight records nothing when it ends: its series would stay, frozen, and its alerts
        (no successful pass, key too old) fire for a target that is no longer configured."""
        with self._targets.lock:
            self._gone.add(target)
            self._targets.series.pop(target, None)
            self._targets.changed(target)

    def set_stuck(self, target: str, stuck: bool) -> None:
        """Whether a pass over ``target`` is running for too long (see daemon.PASS_STUCK_AFTER)."""
        with self._targets.lock:
            series = self._targets.series.get(target)
            value = 1.0 if stuck else 0.0
            if series is not None and series.stuck != value:
                series.stuck = value
                self._targets.changed(target)

    def record_pass(self, report: model.PassReport, now: datetime) -> None:
        """Update the target's metrics from what one pass did and saw.

        A dry run changes nothing in IAM or Vault, so only its errors and duration are recorded.
        """
        with self._targets.lock:
            if report.target in self._gone:
                return
            if report.skipped is not None:
                # another replica worked on it: its metrics are that replica's to report
                if report.target not in self._targets.series:
                    self._targets.series[report.target] = _Series()
                    self._targets.changed(report.target)
                return
            duration = max(report.duration_seconds, 0.0)
            series = self._targets.series.setdefault(report.target, _Series())
            self._targets.changed(report.target)
            for component in report.error_components:
                series.errors[_component_index(component)] += 1
            series.buckets[bisect.bisect_left(PASS_DURATION_BUCKETS, duration)] += 1
            series.duration_sum += duration
            if report.dry_run:
                return
            if report.rotated:
                series.rotations[ROTATION_RESULTS.index("success")] += 1
            if report.rotation_failed:
                series.rotations[ROTATION_RESULTS.index("failure")] += 1
            if report.last_rotation_at is not None:
                series.last_rotation = report.last_rotation_at.timestamp()
            if report.error is None:  # a blocked pass too: RotatorTargetBlocked tells of it
                series.last_pass_success = now.timestamp()
            # A missing value (the pass ended before it could observe) keeps the previous one:
            # dropping the key age exactly when passes fail would hide the "key too old" alert.
            if report.key_created is not None:
                age = (model.utc(now) - model.utc(report.key_created)).total_seconds()
                series.key_age = max(age, 0.0)
            # by age, not the end of a backoff: rotations failing for hours back off further
            # and further, and the "key too old" alert, an hour past this, would never fire
            due = report.due_by_age or report.next_due
            if due is not None:
                series.next_rotation = due.timestamp()
            if report.keys_observed:  # else the pass failed before it could count them
                series.keys = [float(report.keys_active), float(report.keys_inactive)]
                series.foreign = float(report.foreign_keys)
                series.blocked = 1.0 if report.blocked else 0.0

    # --- global ---------------------------------------------------------------------------

    def record_error(self, target: str, component: str) -> None:
        """Count one error; ``target`` is ``""`` for errors of no target (a config reload)."""
        with self._targets.lock:
            if target == GLOBAL_TARGET:
                name = _ERROR_COMPONENTS[_component_index(component)]
                errors = self._targets.global_errors
                errors[name] = errors.get(name, 0.0) + 1
            elif target not in self._gone:
                series = self._targets.series.setdefault(target, _Series())
                series.errors[_component_index(component)] += 1
                self._targets.changed(target)

    def record_reload(self, ok: bool) -> None:
        """Count one configuration reload (the caller counts a failure's ``config`` error)."""
        self.config_reloads.labels(result="success" if ok else "failure").inc()

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def set_unconfigured(self, count: int) -> None:
        self.unconfigured.set(count)

    def set_build_info(self, version: str) -> None:
        """Export ``rotator_build_info{version} 1`` (replacing any previous version)."""
        self.build_info.clear()
        self.build_info.labels(version=version).set(1)

    # --- HTTP -----------------------------------------------------------------------------

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The /metrics body and its content type for an ``Accept`` header: what
        prometheus_client's encoder writes for the registry, the per-target families written
        from cached lines (see :class:`_TargetCollector`)."""
        encoder, content_type = choose_encoder(accept)
        with self._targets.hidden():
            rest = encoder(self.registry).decode()
        eof = "# EOF\n"
        openmetrics = rest.endswith(eof)
        if openmetrics:
            rest = rest[: -len(eof)]
        parts = [rest, *self._targets.exposition(encoder, content_type)]
        if openmetrics:
            parts.append(eof)
        return "".join(parts).encode(), content_type

    def serve(self, host: str, port: int, *, healthy: Probe, ready: Probe) -> MetricsServer:
        """Serve /metrics, /healthz and /readyz on ``host:port`` in a daemon thread.

        ``healthy`` and ``ready`` return a bool, or ``(ok, reason)``: the reason is the 503 body.
        ``host`` is an IPv4 or IPv6 address (``::1``, with or without brackets) or a name; ``""``
        means every IPv4 address. Binding failure raises ``OSError`` unchanged: the caller turns
        it into a config error naming ``metrics.listen``.
        """
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        server = _Server((host, port), _family(host), self.exposition, healthy, ready)
        return MetricsServer(server)


# --- HTTP ----------------------------------------------------------------------------------


def _component_index(component: str) -> int:
    """The error component's slot; anything unknown is ``other`` (the label stays bounded)."""
    if component in COMPONENTS:
        return COMPONENTS.index(component)
    return len(COMPONENTS)


def _probe(check: Probe) -> tuple[bool, str]:
    """Run a health/readiness callback; one that raises counts as failing, never as a crash."""
    try:
        result = check()
    except Exception as exc:  # a probe must answer 503, not kill the request thread
        _log.exception("probe_failed")
        return False, f"probe raised {type(exc).__name__}"
    if isinstance(result, tuple):
        ok, reason = result
        return bool(ok), str(reason)
    return bool(result), ""


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0 (the default): one request per connection, so close() leaves no idle keep-alive
    # thread behind.
    server: _Server
    server_version = "rotator"
    sys_version = ""

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def _dispatch(self, *, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            payload, content_type = self.server.exposition(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, payload, content_type, send_body)
        elif path in ("/healthz", "/readyz"):
            check = self.server.healthy if path == "/healthz" else self.server.ready
            ok, reason = _probe(check)
            if ok:
                body = "ok\n"
            else:
                body = f"not {'healthy' if path == '/healthz' else 'ready'}"
                body += f": {reason}\n" if reason else "\n"
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(status, body.encode(), "text/plain; charset=utf-8", send_body)
        else:
            self._send(
                HTTPStatus.NOT_FOUND,
                b"not found: try /metrics, /healthz or /readyz\n",
                "text/plain; charset=utf-8",
                send_body,
            )

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Prometheus scrapes and kubelet probes would flood stderr: no access log."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # SO_REUSEADDR lets a restarted daemon rebind through TIME_WAIT; SO_REUSEPORT would let two
    # processes share the port silently, hiding a metrics.listen conflict.
    allow_reuse_address = True
    allow_reuse_port = False

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        exposition: Callable[[str], tuple[bytes, str]],
        healthy: Probe,
        ready: Probe,
    ) -> None:
        self.address_family = family
        self.exposition = exposition
        self.healthy = healthy
        self.ready = ready
        super().__init__(address, _Handler)


class MetricsServer:
    """A running metrics/health server; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self.host: str = str(server.server_address[0])
        self.port: int = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="rotator-metrics",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    def close(self) -> None:
        """Stop serving, free the port and wait for the serving thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _family(host: str) -> socket.AddressFamily:
    with contextlib.suppress(ValueError):
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    if host == "":
        return socket.AF_INET
    # A host name: bind the family it resolves to first (an unknown name raises OSError).
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]
