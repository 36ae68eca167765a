"""Every Prometheus metric rotator exports, and the small HTTP server for /metrics and probes.

The only module that imports ``prometheus_client``. Metrics live on an injected
``CollectorRegistry`` (a fresh one by default, never the process-global registry) so tests can
read values with ``registry.get_sample_value`` without sharing state.

Labels are bounded and fixed: ``target`` (a configured target name), ``result``, ``status``,
``component``, ``version``. This module must never put a key id, a secret, an error message or any
other unbounded value into a label.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final, TypeAlias
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

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


class Metrics:
    """rotator's metrics (DESIGN.md section 4) on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._lock = threading.Lock()
        self._targets: set[str] = set()

        self.rotations = Counter(
            "rotator_rotations_total",
            "Rotations attempted, by result (the first key issued for a target counts).",
            ["target", "result"],
            registry=reg,
        )
        self.last_rotation = Gauge(
            "rotator_last_rotation_timestamp_seconds",
            "Unix time of the last successful rotation.",
            ["target"],
            registry=reg,
        )
        self.last_pass_success = Gauge(
            "rotator_last_pass_success_timestamp_seconds",
            "Unix time of the last pass that ended without error.",
            ["target"],
            registry=reg,
        )
        self.key_age = Gauge(
            "rotator_key_age_seconds",
            "Age of the published access key at the last pass.",
            ["target"],
            registry=reg,
        )
        self.next_rotation = Gauge(
            "rotator_next_rotation_timestamp_seconds",
            "Unix time when the next rotation is due.",
            ["target"],
            registry=reg,
        )
        self.access_keys = Gauge(
            "rotator_access_keys",
            "Access keys the target's user has in IAM, by status (active, inactive).",
            ["target", "status"],
            registry=reg,
        )
        self.foreign_keys = Gauge(
            "rotator_foreign_keys",
            "Access keys of the target's user that this rotator did not create.",
            ["target"],
            registry=reg,
        )
        self.blocked = Gauge(
            "rotator_blocked",
            "1 when a due rotation cannot proceed (no free key slot, ...), else 0.",
            ["target"],
            registry=reg,
        )
        self.errors = Counter(
            "rotator_errors_total",
            "Errors by component (eim, vault, verify, lock, config, other).",
            ["target", "component"],
            registry=reg,
        )
        self.pass_duration = Histogram(
            "rotator_pass_duration_seconds",
            "Duration of one pass over one target.",
            ["target"],
            buckets=PASS_DURATION_BUCKETS,
            registry=reg,
        )
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
        self.config_reloads = Counter(
            "rotator_config_reloads_total",
            "Configuration reloads (SIGHUP), by result; a failed reload keeps the old config.",
            ["result"],
            registry=reg,
        )
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result=result)
        self.errors.labels(target=GLOBAL_TARGET, component="config")

    # --- per target -----------------------------------------------------------------------

    def init_target(self, target: str) -> None:
        """Create the target's counter and histogram series at 0 so ``rate()`` works from start.

        Gauges whose zero would be a lie (timestamps, the key age) stay absent until a pass
        reports them; the counts (keys, foreign keys, blocked) start at 0.
        """
        with self._lock:
            if target in self._targets:
                return
            self._targets.add(target)
        for result in ROTATION_RESULTS:
            self.rotations.labels(target=target, result=result)
        for component in (*COMPONENTS, OTHER_COMPONENT):
            self.errors.labels(target=target, component=component)
        self.pass_duration.labels(target=target)
        for status in KEY_STATUSES:
            self.access_keys.labels(target=target, status=status)
        self.foreign_keys.labels(target=target)
        self.blocked.labels(target=target)

    def forget_target(self, target: str) -> None:
        """Remove every series of ``target`` (a config reload dropped it)."""
        with self._lock:
            self._targets.discard(target)
        for result in ROTATION_RESULTS:
            self.rotations.remove(target, result)
        for component in (*COMPONENTS, OTHER_COMPONENT):
            self.errors.remove(target, component)
        for status in KEY_STATUSES:
            self.access_keys.remove(target, status)
        for gauge in (
            self.last_rotation,
            self.last_pass_success,
            self.key_age,
            self.next_rotation,
            self.foreign_keys,
            self.blocked,
        ):
            gauge.remove(target)
        self.pass_duration.remove(target)

    def record_pass(self, report: model.PassReport, now: datetime) -> None:
        """Update the target's metrics from what one pass did and saw.

        A dry run changes nothing in IAM or Vault, so only its errors and duration are recorded.
        """
        target = report.target
        self.init_target(target)
        if report.skipped is not None:
            return  # another replica worked on it: its metrics are that replica's to report
        for component in report.error_components:
            self.record_error(target, component)
        self.pass_duration.labels(target=target).observe(max(report.duration_seconds, 0.0))
        if report.dry_run:
            return

        if report.rotated:
            self.rotations.labels(target=target, result="success").inc()
        if report.rotation_failed:
            self.rotations.labels(target=target, result="failure").inc()
        if report.last_rotation_at is not None:
            self.last_rotation.labels(target=target).set(report.last_rotation_at.timestamp())
        if report.ok:
            self.last_pass_success.labels(target=target).set(now.timestamp())
        # A missing value (the pass ended before it could observe) keeps the previous one: dropping
        # the key age exactly when passes fail would hide the "key too old" alert.
        if report.key_created is not None:
            age = (model.utc(now) - model.utc(report.key_created)).total_seconds()
            self.key_age.labels(target=target).set(max(age, 0.0))
        if report.next_due is not None:
            self.next_rotation.labels(target=target).set(report.next_due.timestamp())
        if report.keys_observed:  # else the pass failed before it could count them
            self.access_keys.labels(target=target, status="active").set(report.keys_active)
            self.access_keys.labels(target=target, status="inactive").set(report.keys_inactive)
            self.foreign_keys.labels(target=target).set(report.foreign_keys)
            self.blocked.labels(target=target).set(1 if report.blocked else 0)

    # --- global ---------------------------------------------------------------------------

    def record_error(self, target: str, component: str) -> None:
        """Count one error; ``target`` is ``""`` for errors of no target (a config reload)."""
        if component not in COMPONENTS:
            component = OTHER_COMPONENT
        self.errors.labels(target=target, component=component).inc()

    def record_reload(self, ok: bool) -> None:
        """Count one configuration reload (the caller counts a failure's ``config`` error)."""
        self.config_reloads.labels(result="success" if ok else "failure").inc()

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def set_build_info(self, version: str) -> None:
        """Export ``rotator_build_info{version} 1`` (replacing any previous version)."""
        self.build_info.clear()
        self.build_info.labels(version=version).set(1)

    # --- HTTP -----------------------------------------------------------------------------

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
        server = _Server((host, port), _family(host), self.registry, healthy, ready)
        return MetricsServer(server)


# --- HTTP ----------------------------------------------------------------------------------


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
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, encoder(self.server.registry), content_type, send_body)
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
        registry: CollectorRegistry,
        healthy: Probe,
        ready: Probe,
    ) -> None:
        self.address_family = family
        self.registry = registry
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
