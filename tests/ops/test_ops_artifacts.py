"""The alert rules and the dashboard RB-09 names exist, pass promtool, and use real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from tests.conftest import unavailable

from idis.integrations.observability._metrics import Metrics

OPS = Path(__file__).resolve().parents[2] / "docs" / "ops"
_PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "increase",
    "max",
    "min",
    "and",
    "on",
    "or",
    "histogram_quantile",
    "le",
    "without",
    "ignoring",
    "avg",
    "count",
    "bool",
    "unless",
    "group_left",
    "group_right",
}


def _exported() -> set[str]:
    names = set(Metrics(CollectorRegistry()).names())
    for name in list(names):
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def _metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_labels)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_groupings)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", without_ranges))
    return {w for w in words if w not in _PROMQL_WORDS and not w[0].isdigit()}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool (Debian package prometheus)")
    assert path is not None
    return path


def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts docs/ops/alerts.yml."""
    result = subprocess.run(
        [_promtool(), "check", "rules", str(OPS / "alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )

    assert 0 == result.returncode, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules` passes the alert unit tests (firing and not firing)."""
    result = subprocess.run(
        [_promtool(), "test", "rules", str(OPS / "alerts_test.yml")],
        capture_output=True,
        text=True,
        check=False,
        cwd=OPS,
    )

    assert 0 == result.returncode, result.stdout + result.stderr


def test_rb09_alert_is_on_integration_errors_by_provider_and_endpoint() -> None:
    """The RB-09 alert aggregates integration_errors_total by provider and endpoint."""
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"][0]["rules"]
    (alert,) = [r for r in rules if r["alert"] == "IDISIntegrationProviderErrors"]

    assert "integration_errors_total" in alert["expr"]
    assert re.search(r"sum by \(provider, endpoint\)", alert["expr"])


def test_every_alert_expression_uses_exported_metrics() -> None:
    """Each rule's metric names are ones the library exports."""
    exported = _exported()
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"][0]["rules"]

    for rule in rules:
        assert _metric_names(rule["expr"]) <= exported, rule["alert"]


def test_dashboard_uid_and_metric_names() -> None:
    """The dashboard has RB-09's uid and every panel queries exported metrics only."""
    dashboard = json.loads((OPS / "dashboard.json").read_text())
    exported = _exported()
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]

    assert "idis-integration-health" == dashboard["uid"]
    assert any("integration_errors_total" in e for e in expressions)
    for expr in expressions:
        assert _metric_names(expr) <= exported, expr


def test_metric_name_extraction_catches_unknown_names() -> None:
    """The name check is not vacuous: an unknown metric is reported."""
    assert {"not_a_metric_total"} == _metric_names(
        'sum by (provider) (rate(not_a_metric_total{a="b"}[5m]))'
    )
