"""deploy/grafana/rotator.json: parses, shows what operators need, queries real metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.deploy import metric_names, tools

DASHBOARD = tools.DEPLOY / "grafana" / "rotator.json"


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_parses_with_unique_panel_ids_and_a_target_variable() -> None:
    dashboard = _dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "rotator_blocked" in variables["target"]["definition"]


def test_dashboard_has_the_panels_operators_need() -> None:
    titles = {panel["title"] for panel in _dashboard()["panels"]}
    for wanted in (
        "Key age vs max_age per target",
        "Time to next rotation",
        "Rotation results",
        "Blocked targets",
        "Errors by component",
        "Foreign keys",
    ):
        assert wanted in titles


def test_every_query_uses_only_exported_metrics() -> None:
    dashboard = _dashboard()
    exported = metric_names.exported() | metric_names.PROMETHEUS_SERIES
    queries = _queries(dashboard)
    assert len(queries) >= 10
    for title, expr in queries:
        used = metric_names.used_in(expr)
        assert used, title
        assert used <= exported, f"panel {title!r} uses unknown {sorted(used - exported)}"
    definition = dashboard["templating"]["list"][1]["definition"]
    assert metric_names.used_in(definition) <= exported


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (Grafana's $target becomes .*)."""
    promtool = tools.find("promtool")
    rules = [
        {"record": f"dashboard:query{index}", "expr": expr.replace("$target", ".*")}
        for index, (_, expr) in enumerate(_queries(_dashboard()))
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = tools.run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
