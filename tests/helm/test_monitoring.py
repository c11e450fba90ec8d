"""The chart's monitoring objects: off by default; when on, the dashboard and rules exactly as shipped."""

from __future__ import annotations

import json

import yaml

from tests.helm.test_chart import CHART, FULL_VALUES, _render, of_kind


def test_monitoring_objects_are_off_by_default() -> None:
    default_manifests = _render(None)
    assert of_kind(default_manifests, "PrometheusRule") == []
    assert not [doc for doc in of_kind(default_manifests, "ConfigMap") if "mwm.json" in doc.get("data", {})]


def test_the_dashboard_and_rules_ship_as_written() -> None:
    full_manifests = _render(str(FULL_VALUES))
    [dashboard] = [doc for doc in of_kind(full_manifests, "ConfigMap") if "mwm.json" in doc.get("data", {})]
    [rule] = of_kind(full_manifests, "PrometheusRule")

    shipped = (CHART / "files" / "grafana-dashboard.json").read_text()
    assert json.loads(dashboard["data"]["mwm.json"]) == json.loads(shipped)
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
