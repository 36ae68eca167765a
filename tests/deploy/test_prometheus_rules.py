"""deploy/prometheus: the rules pass promtool, their tests pass, and they use real metrics."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.deploy import metric_names, tools

RULES = tools.DEPLOY / "prometheus" / "rotator.rules.yml"
RULE_TESTS = tools.DEPLOY / "prometheus" / "rotator.rules.test.yml"
RUNBOOK = tools.ROOT / "docs" / "runbook.md"


def _alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_promtool_check_rules() -> None:
    promtool = tools.find("promtool")
    result = tools.run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    promtool = tools.find("promtool")
    result = tools.run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {alert["alert"] for alert in _alerts()}
    assert names - fired == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


def test_rules_use_only_metrics_rotator_exports() -> None:
    exported = metric_names.exported() | metric_names.PROMETHEUS_SERIES
    for alert in _alerts():
        used = metric_names.used_in(alert["expr"])
        assert used, alert["alert"]
        assert used <= exported, f"{alert['alert']} uses unknown {sorted(used - exported)}"


def test_metric_name_check_catches_a_typo() -> None:
    exported = metric_names.exported()
    assert "rotator_pass_duration_seconds_bucket" in exported
    assert "rotator_rotations_total" in exported
    assert metric_names.used_in('max(rotator_blockd{job="rotator"})') - exported == {
        "rotator_blockd"
    }


def test_every_alert_has_summary_description_and_a_runbook_anchor_that_exists() -> None:
    headings = {
        _anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    for alert in _alerts():
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/runbook.md"
        assert anchor == alert["alert"].lower()
        assert anchor in headings, f"docs/runbook.md has no section {alert['alert']}"
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}
