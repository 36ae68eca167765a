"""rotator.metrics: the DESIGN.md section 4 metrics on an injected registry, and the HTTP server."""

from __future__ import annotations

import errno
import http.client
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from rotator import metrics, model

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = model.Secret("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")

DESIGN_METRICS = {
    # name in the DESIGN table -> (type, label names)
    "rotator_rotations_total": ("counter", {"target", "result"}),
    "rotator_last_rotation_timestamp_seconds": ("gauge", {"target"}),
    "rotator_last_pass_success_timestamp_seconds": ("gauge", {"target"}),
    "rotator_key_age_seconds": ("gauge", {"target"}),
    "rotator_next_rotation_timestamp_seconds": ("gauge", {"target"}),
    "rotator_access_keys": ("gauge", {"target", "status"}),
    "rotator_foreign_keys": ("gauge", {"target"}),
    "rotator_blocked": ("gauge", {"target"}),
    "rotator_errors_total": ("counter", {"target", "component"}),
    "rotator_pass_duration_seconds": ("histogram", {"target"}),
    "rotator_build_info": ("gauge", {"version"}),
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(registry: CollectorRegistry) -> metrics.Metrics:
    return metrics.Metrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def report(**changes: object) -> model.PassReport:
    base: dict[str, object] = {
        "target": "monitoring",
        "ok": True,
        "duration_seconds": 0.3,
        "published_key_id": KEY_ID,
        "key_created": NOW - timedelta(days=2),
        "last_rotation_at": NOW - timedelta(days=2),
        "next_due": NOW + timedelta(days=28),
        "keys_observed": True,
        "keys_active": 1,
        "keys_inactive": 0,
    }
    base.update(changes)
    return model.PassReport(**base)  # type: ignore[arg-type]


# --- the registry --------------------------------------------------------------------------


def test_every_design_metric_is_registered_with_its_type_and_labels(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.init_target("monitoring")
    m.set_build_info("1.2.3")
    m.record_pass(report(), NOW)

    families = {f.name: f for f in registry.collect()}
    for name, (kind, labels) in DESIGN_METRICS.items():
        family_name = name.removesuffix("_total")
        assert family_name in families, name
        family = families[family_name]
        assert family.type == kind, name
        sample_labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert sample_labels == labels, name
    assert value(registry, "rotator_build_info", version="1.2.3") == 1.0


def test_init_target_starts_counters_and_counts_at_zero(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    assert value(registry, "rotator_rotations_total", target="t", result="success") is None

    m.init_target("t")

    for result in ("success", "failure"):
        assert value(registry, "rotator_rotations_total", target="t", result=result) == 0.0
    for component in ("eim", "vault", "verify", "lock", "config"):
        assert value(registry, "rotator_errors_total", target="t", component=component) == 0.0
    assert value(registry, "rotator_pass_duration_seconds_count", target="t") == 0.0
    assert value(registry, "rotator_access_keys", target="t", status="active") == 0.0
    assert value(registry, "rotator_access_keys", target="t", status="inactive") == 0.0
    assert value(registry, "rotator_foreign_keys", target="t") == 0.0
    assert value(registry, "rotator_blocked", target="t") == 0.0


def test_timestamps_and_key_age_stay_absent_until_a_pass_reports_them(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    # A 0 timestamp would read as "last success in 1970" and fire staleness alerts on restart.
    m.init_target("t")
    for name in (
        "rotator_last_rotation_timestamp_seconds",
        "rotator_last_pass_success_timestamp_seconds",
        "rotator_key_age_seconds",
        "rotator_next_rotation_timestamp_seconds",
    ):
        assert value(registry, name, target="t") is None, name


def test_init_target_twice_keeps_the_counts(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.record_pass(report(rotated=True), NOW)
    m.init_target("monitoring")
    assert value(registry, "rotator_rotations_total", target="monitoring", result="success") == 1


def test_two_instances_do_not_share_a_registry() -> None:
    # Each would raise "Duplicated timeseries" if both used the process-global registry.
    first, second = metrics.Metrics(), metrics.Metrics()
    first.record_error("t", "eim")
    assert second.registry is not first.registry
    assert (
        second.registry.get_sample_value(
            "rotator_errors_total", {"target": "t", "component": "eim"}
        )
        is None
    )


# --- record_pass -----------------------------------------------------------------------------


def test_rotated_pass_sets_every_value(m: metrics.Metrics, registry: CollectorRegistry) -> None:
    created = NOW - timedelta(seconds=90)
    m.record_pass(
        report(
            rotated=True,
            key_created=created,
            last_rotation_at=NOW - timedelta(seconds=60),
            next_due=NOW + timedelta(days=30),
            keys_active=2,
            keys_inactive=1,
            foreign_keys=1,
            duration_seconds=4.2,
        ),
        NOW,
    )

    def v(name: str, **labels: str) -> float | None:
        return value(registry, name, target="monitoring", **labels)

    assert v("rotator_rotations_total", result="success") == 1.0
    assert v("rotator_rotations_total", result="failure") == 0.0
    assert v("rotator_last_rotation_timestamp_seconds") == (NOW - timedelta(seconds=60)).timestamp()
    assert v("rotator_last_pass_success_timestamp_seconds") == NOW.timestamp()
    assert v("rotator_key_age_seconds") == 90.0
    assert v("rotator_next_rotation_timestamp_seconds") == (NOW + timedelta(days=30)).timestamp()
    assert v("rotator_access_keys", status="active") == 2.0
    assert v("rotator_access_keys", status="inactive") == 1.0
    assert v("rotator_foreign_keys") == 1.0
    assert v("rotator_blocked") == 0.0
    assert v("rotator_pass_duration_seconds_count") == 1.0
    assert v("rotator_pass_duration_seconds_sum") == 4.2
    assert v("rotator_pass_duration_seconds_bucket", le="5.0") == 1.0
    assert v("rotator_pass_duration_seconds_bucket", le="2.5") == 0.0
    assert v("rotator_errors_total", component="verify") == 0.0


def test_failed_rotation_counts_a_failure_and_its_errors_but_no_success(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.record_pass(report(ok=True), NOW - timedelta(hours=1))
    m.record_pass(
        report(
            ok=False,
            rotation_failed=True,
            error="the new key never authenticated",
            error_components=("verify",),
            key_created=None,
            next_due=None,
        ),
        NOW,
    )

    def v(name: str, **labels: str) -> float | None:
        return value(registry, name, target="monitoring", **labels)

    assert v("rotator_rotations_total", result="failure") == 1.0
    assert v("rotator_rotations_total", result="success") == 0.0
    assert v("rotator_errors_total", component="verify") == 1.0
    assert v("rotator_errors_total", component="eim") == 0.0
    # the failed pass does not move the last success, and keeps what it could not observe
    assert (
        v("rotator_last_pass_success_timestamp_seconds") == (NOW - timedelta(hours=1)).timestamp()
    )
    assert v("rotator_key_age_seconds") == timedelta(days=2, hours=-1).total_seconds()
    assert v("rotator_next_rotation_timestamp_seconds") == (NOW + timedelta(days=28)).timestamp()


def test_next_rotation_stays_at_max_age_while_failed_rotations_back_off(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    # it followed the backoff (capped at 1 h): "key too old", an hour past it, never fired
    due = NOW - timedelta(hours=5)
    m.record_pass(report(due_by_age=due, next_due=NOW + timedelta(minutes=50)), NOW)

    assert (
        value(registry, "rotator_next_rotation_timestamp_seconds", target="monitoring")
        == due.timestamp()
    )


def test_blocked_pass_sets_blocked_and_a_later_pass_clears_it(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.record_pass(report(ok=False, blocked=True, blocked_reason="no free key slot"), NOW)
    assert value(registry, "rotator_blocked", target="monitoring") == 1.0
    # it ended without error: RotatorTargetBlocked tells of it, not RotatorNoSuccessfulPass
    assert (
        value(registry, "rotator_last_pass_success_timestamp_seconds", target="monitoring")
        == NOW.timestamp()
    )

    m.record_pass(report(), NOW + timedelta(minutes=5))
    assert value(registry, "rotator_blocked", target="monitoring") == 0.0


def test_a_stuck_pass_is_exported_until_it_ends(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.init_target("monitoring")
    assert value(registry, "rotator_pass_stuck", target="monitoring") == 0.0

    m.set_stuck("monitoring", True)
    stuck = value(registry, "rotator_pass_stuck", target="monitoring")
    served, _ = m.exposition("text/plain")
    m.set_stuck("monitoring", False)

    assert stuck == 1.0
    assert b'rotator_pass_stuck{target="monitoring"} 1.0' in served  # the cache follows
    assert value(registry, "rotator_pass_stuck", target="monitoring") == 0.0
    m.set_stuck("gone", True)  # a target the metrics do not know: nothing made up
    assert value(registry, "rotator_pass_stuck", target="gone") is None


def test_dry_run_records_only_errors_and_duration(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.record_pass(
        report(
            dry_run=True,
            rotated=True,
            rotation_failed=True,
            blocked=True,
            foreign_keys=3,
            keys_active=2,
            error_components=("vault",),
        ),
        NOW,
    )

    def v(name: str, **labels: str) -> float | None:
        return value(registry, name, target="monitoring", **labels)

    assert v("rotator_errors_total", component="vault") == 1.0
    assert v("rotator_pass_duration_seconds_count") == 1.0
    assert v("rotator_rotations_total", result="success") == 0.0
    assert v("rotator_rotations_total", result="failure") == 0.0
    assert v("rotator_blocked") == 0.0
    assert v("rotator_foreign_keys") == 0.0
    assert v("rotator_access_keys", status="active") == 0.0
    assert v("rotator_last_pass_success_timestamp_seconds") is None
    assert v("rotator_last_rotation_timestamp_seconds") is None
    assert v("rotator_key_age_seconds") is None
    assert v("rotator_next_rotation_timestamp_seconds") is None


def test_each_error_component_entry_counts_once(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.record_pass(report(ok=False, error_components=("eim", "eim", "lock")), NOW)
    assert value(registry, "rotator_errors_total", target="monitoring", component="eim") == 2.0
    assert value(registry, "rotator_errors_total", target="monitoring", component="lock") == 1.0
    assert value(registry, "rotator_errors_total", target="monitoring", component="vault") == 0.0


# --- errors, readiness, build info, reloads ------------------------------------------------


def test_record_error_by_component(m: metrics.Metrics, registry: CollectorRegistry) -> None:
    m.record_error("a", "vault")
    m.record_error("a", "vault")
    m.record_error("b", "eim")
    assert value(registry, "rotator_errors_total", target="a", component="vault") == 2.0
    assert value(registry, "rotator_errors_total", target="b", component="eim") == 1.0
    # a target's first error creates its other series at 0, as init_target does
    assert value(registry, "rotator_errors_total", target="b", component="vault") == 0.0


def test_unknown_component_is_counted_as_other_so_labels_stay_bounded(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.record_error("a", "RuntimeError: something unexpected")
    assert value(registry, "rotator_errors_total", target="a", component="other") == 1.0
    components = {
        s.labels["component"]
        for f in registry.collect()
        if f.name == "rotator_errors"
        for s in f.samples
    }
    assert components <= {"eim", "vault", "verify", "lock", "config", "other"}


def test_global_errors_use_an_empty_target(m: metrics.Metrics, registry: CollectorRegistry) -> None:
    assert value(registry, "rotator_errors_total", target="", component="config") == 0.0
    m.record_error("", "config")
    assert value(registry, "rotator_errors_total", target="", component="config") == 1.0


def test_record_reload_counts_results_only(m: metrics.Metrics, registry: CollectorRegistry) -> None:
    assert value(registry, "rotator_config_reloads_total", result="failure") == 0.0
    m.record_reload(ok=True)
    m.record_reload(ok=False)
    assert value(registry, "rotator_config_reloads_total", result="success") == 1.0
    assert value(registry, "rotator_config_reloads_total", result="failure") == 1.0
    # the daemon counts the failed reload's error itself, with record_error("", "config")
    assert value(registry, "rotator_errors_total", target="", component="config") == 0.0


def test_set_ready(m: metrics.Metrics, registry: CollectorRegistry) -> None:
    m.set_ready(True)
    assert value(registry, "rotator_ready") == 1.0
    m.set_ready(False)
    assert value(registry, "rotator_ready") == 0.0


def test_set_build_info_replaces_the_previous_version(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.set_build_info("1.0.0")
    m.set_build_info("1.1.0")
    assert value(registry, "rotator_build_info", version="1.1.0") == 1.0
    assert value(registry, "rotator_build_info", version="1.0.0") is None


def test_forget_target_removes_its_label_sets_only(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.record_pass(report(target="gone", rotated=True, foreign_keys=1), NOW)
    m.record_pass(report(target="kept", rotated=True), NOW)

    m.forget_target("gone")

    remaining = {s.labels.get("target") for f in registry.collect() for s in f.samples}
    assert "gone" not in remaining
    assert "kept" in remaining
    assert value(registry, "rotator_rotations_total", target="kept", result="success") == 1.0
    # a target that comes back starts again from zero
    m.init_target("gone")
    assert value(registry, "rotator_rotations_total", target="gone", result="success") == 0.0


@pytest.mark.parametrize("skipped", [None, "lock held by replica-b"])
def test_a_pass_of_a_forgotten_target_ending_after_the_reload_leaves_no_series(
    m: metrics.Metrics, registry: CollectorRegistry, skipped: str | None
) -> None:
    m.init_target("gone")
    m.forget_target("gone")  # the reload dropped it while its pass was in flight

    m.record_pass(report(target="gone", rotated=True, skipped=skipped), NOW)
    m.record_error("gone", "vault")

    remaining = {s.labels.get("target") for f in registry.collect() for s in f.samples}
    assert "gone" not in remaining  # else its alerts would fire for ever
    m.init_target("gone")  # configured again: recorded again
    m.record_pass(report(target="gone", rotated=True), NOW)
    assert value(registry, "rotator_rotations_total", target="gone", result="success") == 1.0


def test_forget_an_unknown_target_is_harmless(m: metrics.Metrics) -> None:
    m.forget_target("never-seen")


def test_no_key_id_or_secret_ever_becomes_a_label(
    m: metrics.Metrics, registry: CollectorRegistry
) -> None:
    m.set_build_info("1.2.3")
    m.record_pass(
        report(
            ok=False,
            rotated=True,
            published_key_id=KEY_ID,
            pending_key_id="AKIAI44QH8DHBEXAMPLE",
            error=f"boom {KEY_ID} {SECRET.reveal()}",
            error_components=("verify", f"weird {KEY_ID}"),
            actions=(f"create_key {KEY_ID}",),
        ),
        NOW,
    )
    allowed_names = {"target", "result", "status", "component", "version", "le"}
    for family in registry.collect():
        for sample in family.samples:
            assert set(sample.labels) <= allowed_names, sample
            for label_value in sample.labels.values():
                assert "AKIA" not in label_value, sample
                assert SECRET.reveal() not in label_value, sample


# --- HTTP ------------------------------------------------------------------------------------


@dataclass
class Probes:
    healthy: bool = True
    ready: bool = True
    reason: str = "vault authentication failed"

    def health(self) -> bool:
        return self.healthy

    def readiness(self) -> tuple[bool, str]:
        return self.ready, ("" if self.ready else self.reason)


@pytest.fixture
def probes() -> Probes:
    return Probes()


@pytest.fixture
def server(m: metrics.Metrics, probes: Probes) -> Iterator[metrics.MetricsServer]:
    m.set_build_info("9.9.9")
    srv = m.serve("127.0.0.1", 0, healthy=probes.health, ready=probes.readiness)
    yield srv
    srv.close()


def get(
    port: int, path: str, *, host: str = "127.0.0.1", method: str = "GET"
) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def test_metrics_endpoint_serves_the_registry(server: metrics.MetricsServer) -> None:
    status, content_type, body = get(server.port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'rotator_build_info{version="9.9.9"} 1.0' in body


def test_metrics_endpoint_ignores_a_query_string(server: metrics.MetricsServer) -> None:
    status, _, body = get(server.port, "/metrics?debug=1")
    assert status == 200
    assert "rotator_build_info" in body


def test_healthz_follows_the_health_callback(server: metrics.MetricsServer, probes: Probes) -> None:
    assert get(server.port, "/healthz")[::2] == (200, "ok\n")
    probes.healthy = False
    status, _, body = get(server.port, "/healthz")
    assert status == 503
    assert body.startswith("not healthy")


def test_readyz_follows_the_ready_callback_and_says_why(
    server: metrics.MetricsServer, probes: Probes
) -> None:
    assert get(server.port, "/readyz")[::2] == (200, "ok\n")
    probes.ready = False
    status, _, body = get(server.port, "/readyz")
    assert status == 503
    assert body == "not ready: vault authentication failed\n"


def test_a_probe_that_raises_answers_503(m: metrics.Metrics) -> None:
    def broken() -> bool:
        raise RuntimeError("scheduler state unknown")

    with m.serve("127.0.0.1", 0, healthy=broken, ready=lambda: True) as srv:
        status, _, body = get(srv.port, "/healthz")
        assert status == 503
        assert "RuntimeError" in body
        assert get(srv.port, "/readyz")[0] == 200


@pytest.mark.parametrize("path", ["/", "/metricsx", "/health", "/readyz/extra"])
def test_other_paths_answer_404(server: metrics.MetricsServer, path: str) -> None:
    assert get(server.port, path)[0] == 404


def test_head_answers_without_a_body(server: metrics.MetricsServer) -> None:
    status, _, body = get(server.port, "/healthz", method="HEAD")
    assert status == 200
    assert body == ""


def test_a_port_in_use_raises_oserror(m: metrics.Metrics, server: metrics.MetricsServer) -> None:
    with pytest.raises(OSError, match="in use") as info:
        m.serve("127.0.0.1", server.port, healthy=lambda: True, ready=lambda: True)
    assert info.value.errno == errno.EADDRINUSE


def test_close_frees_the_port(m: metrics.Metrics) -> None:
    first = m.serve("127.0.0.1", 0, healthy=lambda: True, ready=lambda: True)
    port = first.port
    assert get(port, "/healthz")[0] == 200
    first.close()
    first.close()  # idempotent

    with pytest.raises(ConnectionRefusedError):
        get(port, "/healthz")
    second = m.serve("127.0.0.1", port, healthy=lambda: True, ready=lambda: True)
    try:
        assert second.port == port
        assert get(port, "/healthz")[0] == 200
    finally:
        second.close()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_serves_on_ipv6_loopback(m: metrics.Metrics, host: str) -> None:
    with m.serve(host, 0, healthy=lambda: True, ready=lambda: True) as srv:
        assert srv.host == "::1"
        assert get(srv.port, "/healthz", host="::1")[0] == 200


def test_a_pass_that_never_listed_the_keys_keeps_the_previous_key_counts() -> None:
    m = metrics.Metrics()
    m.record_pass(report(keys_active=2, foreign_keys=1), NOW)
    m.record_pass(report(ok=False, keys_observed=False, keys_active=0, foreign_keys=0), NOW)
    sample = m.registry.get_sample_value
    assert sample("rotator_access_keys", {"target": "monitoring", "status": "active"}) == 2
    assert sample("rotator_foreign_keys", {"target": "monitoring"}) == 1


# --- /metrics from cached per-target lines ------------------------------------------------------

TEXT = "text/plain"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def families(text: str) -> dict[str, list[str]]:
    """An exposition as {family header: its sample lines, in order}; families in any order."""
    out: dict[str, list[str]] = {}
    for chunk in text.split("# HELP ")[1:]:
        lines = chunk.splitlines()
        header = "\n".join(x for x in lines if x.startswith("# TYPE") or x is lines[0])
        out[header] = [x for x in lines[1:] if not x.startswith("#")]
    return out


def reference(m: metrics.Metrics, accept: str) -> str:
    """What prometheus_client's own encoder writes for the whole registry."""
    encoder, _ = metrics.choose_encoder(accept)
    return encoder(m.registry).decode()


def busy(m: metrics.Metrics) -> None:
    """Targets in every state: fresh, rotated, failing, blocked, forgotten, with a global error."""
    for name in ("alpha", "bravo", "charlie", "delta"):
        m.init_target(name)
    m.record_pass(report(target="alpha", rotated=True), NOW)
    m.record_pass(
        report(
            target="bravo", ok=False, error="x", error_components=("vault",), keys_observed=False
        ),
        NOW,
    )
    m.record_pass(report(target="charlie", blocked=True, foreign_keys=1, keys_active=2), NOW)
    m.record_error("", "config")
    m.forget_target("delta")


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_the_exposition_is_what_prometheus_clients_encoder_writes(
    m: metrics.Metrics, accept: str
) -> None:
    m.set_build_info("9.9.9")
    busy(m)

    body, content_type = m.exposition(accept)
    text = body.decode()

    assert families(text) == families(reference(m, accept))
    assert content_type == metrics.choose_encoder(accept)[1]
    assert text.endswith("# EOF\n") == (accept == OPENMETRICS)
    assert text.count("# EOF") == (accept == OPENMETRICS)
    assert 'target="delta"' not in text


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
def test_a_change_after_a_scrape_is_in_the_next_scrape(m: metrics.Metrics, accept: str) -> None:
    busy(m)
    m.exposition(accept)  # fills the cache

    m.record_pass(report(target="alpha", rotated=True, keys_active=2), NOW + timedelta(hours=1))
    m.record_error("charlie", "eim")
    m.init_target("echo")
    m.forget_target("bravo")
    text = m.exposition(accept)[0].decode()

    assert families(text) == families(reference(m, accept))
    assert 'target="echo"' in text and 'target="bravo"' not in text


def test_accept_headers_naming_many_versions_keep_a_bounded_cache(m: metrics.Metrics) -> None:
    busy(m)
    for minor in range(20):
        accept = f"application/openmetrics-text; version=1.{minor}.0"
        text = m.exposition(accept)[0].decode()
        assert families(text) == families(reference(m, accept))

    assert len(m._targets._lines) <= metrics._FORMATS_KEPT
