"""The Helm chart in helm/mwm, rendered with `helm template` (default values and ci/full-values.yaml).

Needs helm at ${MWM_CACHE_DIR:-$HOME/.cache/mwm}/bin/helm (helm/check.sh installs it): the tests fail,
not skip, without it.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "mwm"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
CONSUMERS = ("discovery", "scheduler", "monitor", "exporter")
RELEASE = "mwm"
NAMESPACE = "mwm-test"

Manifest = dict[str, Any]


def helm_binary() -> Path:
    cache_dir = Path(os.environ.get("MWM_CACHE_DIR") or Path.home() / ".cache" / "mwm")
    return cache_dir / "bin" / "helm"


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    helm = helm_binary()
    if not os.access(helm, os.X_OK):
        pytest.fail(f"helm is not installed at {helm}: run helm/check.sh first")
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, check=False)


def template(*extra: str) -> subprocess.CompletedProcess[str]:
    return run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra)


@cache
def _render(values_file: str | None) -> tuple[Manifest, ...]:
    result = template(*(["-f", values_file] if values_file else []))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=["default", "full"])
def manifests(request: pytest.FixtureRequest) -> tuple[Manifest, ...]:
    return _render(None if request.param == "default" else str(FULL_VALUES))


@pytest.fixture
def default_manifests() -> tuple[Manifest, ...]:
    return _render(None)


@pytest.fixture
def full_manifests() -> tuple[Manifest, ...]:
    return _render(str(FULL_VALUES))


def of_kind(docs: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [doc for doc in docs if doc["kind"] == kind]


def workloads(docs: tuple[Manifest, ...]) -> list[Manifest]:
    """The Deployments and the StatefulSets (the gateway, for its spool volume)."""
    return [doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")]


def component(doc: Manifest) -> str:
    labels: dict[str, str] = doc["metadata"]["labels"]
    return labels["app.kubernetes.io/component"]


def containers(deployment: Manifest) -> list[Manifest]:
    result: list[Manifest] = deployment["spec"]["template"]["spec"]["containers"]
    return result


def consumer_deployments(docs: tuple[Manifest, ...]) -> dict[str, Manifest]:
    return {
        component(d).removeprefix("consumer-"): d
        for d in workloads(docs)
        if component(d).startswith("consumer-")
    }


def secret_values(docs: tuple[Manifest, ...]) -> dict[str, str]:
    values: dict[str, str] = {}
    for secret in of_kind(docs, "Secret"):
        values.update(secret.get("stringData") or {})
        for key, encoded in (secret.get("data") or {}).items():
            values[key] = base64.b64decode(encoded).decode()
    return values


def test_helm_is_installed() -> None:
    result = run_helm("version", "--short")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("v3.")


def test_lint_passes_for_default_and_full_values() -> None:
    for extra in ([], ["-f", str(FULL_VALUES)]):
        result = run_helm("lint", "--strict", str(CHART), *extra)
        assert result.returncode == 0, result.stdout + result.stderr


def test_one_deployment_per_consumer_plus_api_and_gateway(manifests: tuple[Manifest, ...]) -> None:
    components = sorted(component(d) for d in workloads(manifests))
    assert components == sorted(["api", "gateway", *(f"consumer-{name}" for name in CONSUMERS)])


def test_consumers_run_mwm_consume_name(manifests: tuple[Manifest, ...]) -> None:
    deployments = consumer_deployments(manifests)
    assert sorted(deployments) == sorted(CONSUMERS)
    for name, deployment in deployments.items():
        (container,) = containers(deployment)
        assert [*container["command"], *container["args"]] == ["mwm", "consume", name]


def test_api_and_gateway_commands_and_ports(manifests: tuple[Manifest, ...]) -> None:
    deployments = {component(d): d for d in workloads(manifests)}
    (api,) = containers(deployments["api"])
    (gateway,) = containers(deployments["gateway"])
    assert [*api["command"], *api["args"]] == ["mwm", "api"]
    assert [*gateway["command"], *gateway["args"]] == ["mwm", "gateway"]
    assert {p["name"]: p["containerPort"] for p in api["ports"]} == {"observability": 9100, "http": 8000}
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {
        "observability": 9100,
        "dicom": 11112,
    }


def test_every_container_has_liveness_and_readiness_probes(manifests: tuple[Manifest, ...]) -> None:
    for deployment in workloads(manifests):
        for container in containers(deployment):
            liveness = container["livenessProbe"]["httpGet"]
            readiness = container["readinessProbe"]["httpGet"]
            assert liveness == {"path": "/healthz", "port": "observability"}
            assert readiness == {"path": "/readyz", "port": "observability"}


def test_pods_run_as_non_root_with_a_read_only_root(manifests: tuple[Manifest, ...]) -> None:
    for deployment in workloads(manifests):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["terminationGracePeriodSeconds"] > 30
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["runAsUser"] == 10001
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/var/lib/mwm/work"]]


def test_config_map_holds_the_non_secret_settings(manifests: tuple[Manifest, ...]) -> None:
    (config_map,) = [
        doc for doc in of_kind(manifests, "ConfigMap") if doc["metadata"]["name"] == "mwm-config"
    ]
    data: dict[str, str] = config_map["data"]
    assert data["MWM_OBSERVABILITY__LOG_FORMAT"] == "json"
    assert data["MWM_OBSERVABILITY__HTTP_HOST"] == "0.0.0.0"
    assert data["MWM_WORK_DIR"] == "/var/lib/mwm/work"
    for deployment in workloads(manifests):
        for container in containers(deployment):
            assert {"configMapRef": {"name": config_map["metadata"]["name"]}} in container["envFrom"]


def test_secrets_never_appear_in_a_config_map(manifests: tuple[Manifest, ...]) -> None:
    secrets = secret_values(manifests)
    assert "MWM_BUS__URL" in secrets and "MWM_MONGO__URL" in secrets
    for config_map in of_kind(manifests, "ConfigMap"):
        data: dict[str, str] = config_map.get("data") or {}
        assert not set(data) & set(secrets), "a secret key is also in a ConfigMap"
        for key, value in data.items():
            for secret_key, secret in secrets.items():
                assert secret not in value, f"{secret_key}'s value is in ConfigMap key {key}"


def test_full_values_put_every_credential_in_the_secret(full_manifests: tuple[Manifest, ...]) -> None:
    assert set(secret_values(full_manifests)) == {
        "MWM_BUS__URL",
        "MWM_MONGO__URL",
        "MWM_OBJECT_STORE__ACCESS_KEY",
        "MWM_OBJECT_STORE__SECRET_KEY",
        "MWM_ARGO__TOKEN",
        "MWM_API__BOOTSTRAP_ADMIN_KEY",
    }
    for deployment in workloads(full_manifests):
        env = {e["name"]: e for e in containers(deployment)[0]["env"]}
        assert env["MWM_BUS__URL"]["valueFrom"]["secretKeyRef"]["name"] == "mwm-secrets"


def test_existing_secret_creates_no_secret() -> None:
    result = template("--set", "secrets.existingSecret=platform-mwm")
    assert result.returncode == 0, result.stderr
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    assert of_kind(docs, "Secret") == []
    for deployment in workloads(docs):
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in containers(deployment)[0]["env"]
            if "valueFrom" in e
        }
        assert refs == {"platform-mwm"}


def test_no_keda_objects_by_default(default_manifests: tuple[Manifest, ...]) -> None:
    assert of_kind(default_manifests, "ScaledObject") == []
    assert of_kind(default_manifests, "TriggerAuthentication") == []
    for deployment in consumer_deployments(default_manifests).values():
        assert deployment["spec"]["replicas"] == 1


def test_keda_scaled_objects_with_full_values(full_manifests: tuple[Manifest, ...]) -> None:
    scaled = of_kind(full_manifests, "ScaledObject")
    assert len(scaled) == 4
    (auth,) = of_kind(full_manifests, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "mwm-secrets", "key": "MWM_BUS__URL"}
    ]
    deployments = consumer_deployments(full_manifests)
    queues: dict[str, str] = {}
    for obj in scaled:
        name = component(obj).removeprefix("consumer-")
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert obj["spec"]["scaleTargetRef"]["name"] == deployments[name]["metadata"]["name"]
        assert "replicas" not in deployments[name]["spec"], "KEDA owns replicas"
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        queues[name] = trigger["metadata"]["queueName"]
    assert queues == {name: f"mwm.{name}" for name in CONSUMERS}


def test_keda_for_one_consumer_only() -> None:
    result = template("--set", "consumers.exporter.keda.enabled=true")
    assert result.returncode == 0, result.stderr
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    (scaled,) = of_kind(docs, "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["queueName"] == "mwm.exporter"
    assert len(of_kind(docs, "TriggerAuthentication")) == 1


def test_pod_disruption_budgets_only_when_enabled(
    default_manifests: tuple[Manifest, ...], full_manifests: tuple[Manifest, ...]
) -> None:
    assert of_kind(default_manifests, "PodDisruptionBudget") == []
    pdbs = of_kind(full_manifests, "PodDisruptionBudget")
    deployments = workloads(full_manifests)
    assert sorted(component(p) for p in pdbs) == sorted(component(d) for d in deployments)
    for pdb in pdbs:
        (deployment,) = [d for d in deployments if component(d) == component(pdb)]
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_gateway_service_type_is_configurable(
    default_manifests: tuple[Manifest, ...], full_manifests: tuple[Manifest, ...]
) -> None:
    def gateway_service(docs: tuple[Manifest, ...]) -> Manifest:
        (service,) = [s for s in of_kind(docs, "Service") if component(s) == "gateway"]
        return service

    assert gateway_service(default_manifests)["spec"]["type"] == "ClusterIP"
    service = gateway_service(full_manifests)
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"] == [
        {"name": "dicom", "port": 11112, "targetPort": "dicom", "protocol": "TCP"}
    ]


def test_argo_rbac(full_manifests: tuple[Manifest, ...]) -> None:
    roles = {r["metadata"]["name"]: r for r in of_kind(full_manifests, "Role")}
    engine_rules = roles["mwm-argo-engine"]["rules"]
    assert roles["mwm-argo-engine"]["metadata"]["namespace"] == "argo-workflows"
    resources = {res: set(rule["verbs"]) for rule in engine_rules for res in rule["resources"]}
    assert {"create", "get", "delete", "patch"} <= resources["workflows"]
    assert "get" in resources["workflowtemplates"]
    executor = {
        res: set(rule["verbs"]) for rule in roles["mwm-workflow"]["rules"] for res in rule["resources"]
    }
    assert {"get", "patch"} <= executor["pods"]
    assert {"create", "patch"} <= executor["workflowtaskresults"]
    deployments = consumer_deployments(full_manifests)
    for name in ("scheduler", "monitor"):
        assert deployments[name]["spec"]["template"]["spec"]["serviceAccountName"] == "mwm-argo-engine"
    for name in ("discovery", "exporter"):
        assert deployments[name]["spec"]["template"]["spec"]["serviceAccountName"] == "mwm"


def test_argo_rbac_can_be_turned_off() -> None:
    result = template("--set", "argo.rbac.create=false")
    assert result.returncode == 0, result.stderr
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    assert of_kind(docs, "Role") == [] and of_kind(docs, "RoleBinding") == []


@pytest.mark.parametrize(
    "bad",
    [
        "consumers.discovery.replicas=-1",
        "consumers.discovry.replicas=1",
        "consumers.scheduler.keda.queueLenght=5",
        "gateway.service.type=Bogus",
        "unknownTopLevel=1",
    ],
)
def test_values_schema_rejects_bad_values(bad: str) -> None:
    result = template("--set", bad)
    assert result.returncode != 0, f"--set {bad} was accepted"
    assert "schema" in result.stderr


def test_rendered_manifests_match_the_kubernetes_schemas(tmp_path: Path) -> None:
    files: list[str] = []
    for name, values in (("default", None), ("full", str(FULL_VALUES))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(_render(values)))
        files.append(str(path))
    result = subprocess.run(
        [sys.executable, str(REPO / "helm" / "validate_manifests.py"), *files],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _all_names(docs: tuple[Manifest, ...]) -> Iterator[str]:
    for doc in docs:
        yield f"{doc['kind']}/{doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}"


def test_resource_names_are_unique(manifests: tuple[Manifest, ...]) -> None:
    names = list(_all_names(manifests))
    assert len(names) == len(set(names))


def test_the_gateway_is_a_stateful_set_with_its_spool_on_a_persistent_volume(
    manifests: tuple[Manifest, ...],
) -> None:
    (gateway,) = of_kind(manifests, "StatefulSet")
    assert component(gateway) == "gateway"
    (claim,) = gateway["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    (container,) = containers(gateway)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert mounts["spool"] == env["MWM_GATEWAY__SPOOL_DIR"] == "/var/lib/mwm/spool"
    assert int(env["MWM_GATEWAY__SPOOL_MAX_BYTES"]) < 20 * 1024**3
    assert int(env["MWM_GATEWAY__SPOOL_PREALLOCATED_FILES"]) * 1024**2 < 20 * 1024**3
    services = {s["metadata"]["name"] for s in of_kind(manifests, "Service")}
    assert gateway["spec"]["serviceName"] in services


def test_a_cronjob_runs_retention_with_the_settings_of_the_other_pods(
    manifests: tuple[Manifest, ...],
) -> None:
    [cronjob] = of_kind(manifests, "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [api] = [d for d in workloads(manifests) if component(d) == "api"]
    [api_container] = containers(api)
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid", "two cleanups never overlap"
    assert [container["command"], container["args"]] == [["mwm"], ["cleanup"]]
    assert container["envFrom"] == api_container["envFrom"], "the same ConfigMap as the other pods"
    assert container["env"] == [e for e in api_container["env"] if "valueFrom" in e], (
        "the same credentials from the Secret"
    )
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts["/var/lib/mwm/work"]]


def test_the_cleanup_cronjob_can_be_turned_off() -> None:
    result = template("--set", "cleanup.enabled=false")
    assert result.returncode == 0, result.stderr
    assert not [doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "CronJob"]
