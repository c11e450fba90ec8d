"""Every workload of the chart, run as the chart runs it, answers its probes as the kubelet asks them.

The chart is rendered with its services pointed at the local ones (``rabbitmq.url``, ``mongodb.url``,
``objectStore.*`` from this environment's settings). For each Deployment or StatefulSet, its container is
started with the command, arguments and environment the manifests give it (ConfigMap and Secret
resolved, ports and emptyDir mounts moved as `tests.support.roles` says); its liveness probe must succeed
before the kubelet would restart it and its readiness probe must succeed; SIGTERM must end it with exit
code 0 within its termination grace period. Before it is stopped, every metric the shipped dashboard and
alert rules use must be on the ``/metrics`` of one of the roles.

Fails, not skips, without helm (``helm/check.sh`` installs it) or the services.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import yaml

from tests.helm.test_chart import CHART, Manifest, template
from tests.support.roles import Probe, RoleSpec, RunningRole, started_role
from tests.support.services import require_services
from wm.config import Settings

DASHBOARD = CHART / "files" / "grafana-dashboard.json"
RULES = CHART / "files" / "prometheus-rules.yaml"
WORKLOADS = ("Deployment", "StatefulSet")
METRIC = re.compile(r"\bmwm_[a-z0-9_]+")


def local_values(settings: Settings) -> dict[str, Any]:
    """Values pointing the chart at this environment's services, with the monitoring objects on."""
    store = settings.object_store
    return {
        "rabbitmq": {"url": settings.bus.url},
        "mongodb": {"url": settings.mongo.url},
        "objectStore": {
            "endpoint": store.endpoint,
            "accessKey": store.access_key,
            "secretKey": store.secret_key,
        },
        "monitoring": {"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}},
    }


def role_specs(docs: list[Manifest]) -> list[RoleSpec]:
    """What each workload's container is given, as `RoleSpec`s."""
    config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"}
    secrets = {doc["metadata"]["name"]: doc.get("stringData", {}) for doc in docs if doc["kind"] == "Secret"}
    specs = []
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        pod = doc["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]])
        for variable in container.get("env", []):
            env[variable["name"]] = _env_value(variable, secrets, config_maps)
        env = {key: value for key, value in env.items() if value is not None}
        specs.append(
            RoleSpec(
                name=doc["metadata"]["name"],
                argv=[*container["command"], *container.get("args", [])],
                env=env,
                ports={port["name"]: port["containerPort"] for port in container.get("ports", [])},
                liveness=Probe.from_manifest(container["livenessProbe"]),
                readiness=Probe.from_manifest(container["readinessProbe"]),
                mounts={
                    mount["mountPath"]: f"{doc['metadata']['name']}-{mount['name']}"  # emptyDirs: one per pod
                    for mount in container.get("volumeMounts", [])
                },
                grace_period_s=pod.get("terminationGracePeriodSeconds", 30),
            )
        )
    return specs


def _env_value(variable: dict[str, Any], secrets: dict[str, Any], config_maps: dict[str, Any]) -> Any:
    if "value" in variable:
        return variable["value"]
    source = variable["valueFrom"]
    reference = source.get("secretKeyRef") or source.get("configMapKeyRef")
    store = secrets if "secretKeyRef" in source else config_maps
    value = store.get(reference["name"], {}).get(reference["key"])
    assert value is not None or reference.get("optional"), f"{variable['name']}: {reference} is missing"
    return value


@pytest.fixture(scope="module")
def chart_roles(tmp_path_factory: pytest.TempPathFactory) -> list[RoleSpec]:
    settings = Settings()
    require_services(settings)
    values = tmp_path_factory.mktemp("values") / "local-values.yaml"
    values.write_text(yaml.safe_dump(local_values(settings)))
    rendered = template("-f", str(values))
    assert rendered.returncode == 0, rendered.stderr
    specs = role_specs([doc for doc in yaml.safe_load_all(rendered.stdout) if doc])
    names = {spec.name for spec in specs}
    assert {f"mwm-{role}" for role in ("api", "gateway")} <= names, names
    return specs


@pytest.fixture(scope="module")
def running_roles(
    chart_roles: list[RoleSpec], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[RunningRole]]:
    """Every workload started at once (each on its own ports), stopped at the end of the module."""
    scratch = tmp_path_factory.mktemp("chart-as-run")
    with ExitStack() as stack:
        yield [stack.enter_context(started_role(spec, scratch)) for spec in chart_roles]


@pytest.mark.timeout(600)
def test_every_workload_passes_its_liveness_and_readiness_probes(running_roles: list[RunningRole]) -> None:
    for role in running_roles:
        assert role.spec.liveness is not None and role.spec.readiness is not None
        # The kubelet restarts a container whose liveness probe fails that long after its start.
        role.wait_until(role.spec.liveness, within_s=role.spec.liveness.restart_after_s)
        role.wait_until(role.spec.readiness, within_s=120)


@pytest.mark.timeout(600)
def test_the_metrics_of_the_dashboard_and_alert_rules_are_served(running_roles: list[RunningRole]) -> None:
    for role in running_roles:
        assert role.spec.readiness is not None
        role.wait_until(role.spec.readiness, within_s=120)
    served: set[str] = set()
    for role in running_roles:
        for line in role.metrics().splitlines():
            served.update(_family(name) for name in METRIC.findall(line))
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load(RULES.read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {_family(name) for expr in expressions for name in METRIC.findall(expr)}
    assert used, "no metric names found in the dashboard and rules"
    assert used <= served, f"used but served by no role: {sorted(used - served)}"


def _family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


@pytest.mark.timeout(600)
def test_sigterm_ends_every_workload_cleanly_within_its_grace_period(
    running_roles: list[RunningRole],
) -> None:
    codes = {role.spec.name: role.terminate() for role in running_roles}
    assert all(code == 0 for code in codes.values()), {
        name: (code, next(r for r in running_roles if r.spec.name == name).tail(1500))
        for name, code in codes.items()
        if code != 0
    }
