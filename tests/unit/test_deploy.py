"""deploy/: the alert rules and the dashboard only use metrics Herald exports."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import REGISTRY

from pipeline import metrics
from pipeline.settings import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def exported() -> set[str]:
    assert metrics.INTENTS  # the module registers Herald's metrics on import
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    names = {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("herald_")
        for suffix in suffixes.get(family.type, ("",))
    }
    lag_source = (REPO_ROOT / "pipeline" / "web" / "lag.py").read_text()
    return names | set(re.findall(r'"(kafka_[a-z_]+)"', lag_source)) | {"up"}


def used(expression: str) -> set[str]:
    return set(re.findall(r"\b((?:herald|kafka)_[a-z_]+|up)\b(?=\s*[{\[)])", expression))


def test_alert_rules_are_well_formed_and_use_exported_metrics() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "herald-alerts.yml").read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"HeraldWorkerDown", "HeraldConsumerLagGrowing", "HeraldDeadLetterSpike"} <= names
    assert "HeraldDeliveryFailureRatio" in names
    known = exported()
    for rule in rules:
        assert rule["labels"]["severity"] in {"page", "warn", "info"}
        assert rule["annotations"]["summary"]
        assert used(rule["expr"]) <= known, (rule["alert"], used(rule["expr"]) - known)


def test_dashboard_panels_use_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "herald-dashboard.json").read_text())
    known = exported()
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(expressions) >= 10
    for expression in expressions:
        assert used(expression), expression
        assert used(expression) <= known, (expression, used(expression) - known)
