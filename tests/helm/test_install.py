"""The chart installed into a real API server (``scripts/argo-stack``): admitted, scheduled, and its RBAC.

KEDA's CRDs (from KEDA's Go module, fetched by ``scripts/argo-stack build``) are applied first, so the
ScaledObjects of the full values are admitted as in a cluster with KEDA. The Argo engine's service account
is checked twice: with ``kubectl auth can-i`` as that account (what it may and may not do), and by the
engine itself through the Argo Server in client mode with a token of that account (create, read,
terminate, delete a workflow).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devkit.argo_stack import ArgoStack, argo_stack
from devkit.services import wait_for
from tests.helm.test_chart import CHART, FULL_VALUES, run_helm
from wm.config import Settings
from wm.engines.argo import ArgoEngine
from wm.engines.argo_workflow import ArgoEngineSettings
from wm.errors import PermanentError

RELEASE = "mwm"
ENGINE_MAY = [
    *(
        (verb, "workflows.argoproj.io")
        for verb in ("create", "get", "list", "watch", "update", "patch", "delete")
    ),
    *((verb, "workflowtemplates.argoproj.io") for verb in ("get", "list", "watch")),
]
"""What the chart's README and comments say the Argo engine's account may do in the Argo namespace."""
ENGINE_MAY_NOT = [
    ("create", "workflowtemplates.argoproj.io"),
    ("delete", "workflowtemplates.argoproj.io"),
    ("get", "clusterworkflowtemplates.argoproj.io"),
    ("create", "workflowtaskresults.argoproj.io"),
    ("create", "pods"),
    ("get", "pods"),
    ("get", "secrets"),
    ("create", "pods/exec"),
    ("create", "roles.rbac.authorization.k8s.io"),
]


def kubectl(stack: ArgoStack, *args: str, input_json: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [stack.kubectl, f"--kubeconfig={stack.kubeconfig}", *args],
        input=input_json,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def stack_with_keda() -> ArgoStack:
    stack = argo_stack()
    applied = kubectl(stack, "apply", "--server-side", "--force-conflicts", "-f", str(stack.keda_crds))
    assert applied.returncode == 0, applied.stderr
    # `kubectl wait` errs (instead of waiting) while a fresh CRD has no status yet: ask again.
    give_up = time.monotonic() + 60
    while (
        established := kubectl(stack, "wait", "--for=condition=Established", "crd/scaledobjects.keda.sh")
    ).returncode:
        assert time.monotonic() < give_up, established.stderr
        time.sleep(0.5)
    return stack


@dataclass(frozen=True)
class Release:
    stack: ArgoStack
    namespace: str

    @property
    def engine_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{RELEASE}-argo-engine"


def install(stack: ArgoStack, *values: str) -> Release:
    """``helm install`` into a namespace of its own, the Argo objects into the stack's namespace.

    Without ``--wait``: the full values' LoadBalancer Service never gets an address here (no cloud); the
    pods are waited for by the tests.
    """
    namespace = f"mwm-{uuid.uuid4().hex[:8]}"
    provide_spool_volumes(stack, namespace, replicas=2)
    result = run_helm(
        "install", RELEASE, str(CHART), f"--kubeconfig={stack.kubeconfig}", "--namespace", namespace,
        "--create-namespace", "--timeout", "180s", "--set", f"argo.namespace={stack.namespace}",
        *values,
    )  # fmt: skip
    release = Release(stack, namespace)
    if result.returncode != 0:
        uninstall(release)  # a refused install can leave objects (in the Argo namespace too) behind
    assert result.returncode == 0, f"helm install {values} was refused: {result.stderr}"
    return release


def provide_spool_volumes(stack: ArgoStack, namespace: str, replicas: int) -> None:
    """A volume for each gateway replica's spool claim, as a cluster's provisioner would make (this one has
    no storage provisioner): bound to its claim by the API server's volume binder."""
    for ordinal in range(replicas):
        claim = f"spool-{RELEASE}-gateway-{ordinal}"
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-{claim}", "labels": {"mwm-test/namespace": namespace}},
            "spec": {
                "capacity": {"storage": "1Ti"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": f"/var/lib/mwm-test/{namespace}/{claim}"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
        created = kubectl(stack, "create", "-f", "-", input_json=json.dumps(volume))
        assert created.returncode == 0, created.stderr


def uninstall(release: Release) -> None:
    run_helm(
        "uninstall", RELEASE, f"--kubeconfig={release.stack.kubeconfig}", "--namespace", release.namespace
    )
    kubectl(release.stack, "delete", "namespace", release.namespace, "--wait=false")
    kubectl(release.stack, "delete", "pv", "-l", f"mwm-test/namespace={release.namespace}", "--wait=false")


@pytest.fixture(params=["default", "full"])
def release(stack_with_keda: ArgoStack, request: pytest.FixtureRequest) -> Iterator[Release]:
    # The full values' PrometheusRule needs the Prometheus Operator's CRD, which this API server lacks; the
    # rendered rule is validated against its schema by helm/check.sh and promtool instead.
    full = ["-f", str(FULL_VALUES), "--set", "monitoring.prometheusRule.enabled=false"]
    # The dashboard's ConfigMap goes where the Grafana sidecar of a monitoring stack looks for it.
    kubectl(stack_with_keda, "create", "namespace", "monitoring")  # AlreadyExists on later runs: fine
    installed = install(stack_with_keda, *([] if request.param == "default" else full))
    yield installed
    uninstall(installed)


def can_i(release: Release, verb: str, resource: str, namespace: str) -> bool:
    """``kubectl auth can-i`` as the chart's Argo engine account."""
    answer = kubectl(
        release.stack, "auth", "can-i", verb, resource, "-n", namespace, f"--as={release.engine_account}"
    )
    assert answer.stdout.strip() in ("yes", "no"), answer.stderr
    return answer.stdout.strip() == "yes"


def engine_rbac_problems(release: Release) -> list[str]:
    """Every permission the docs give the engine's account that it lacks, and every one it has beyond them."""
    namespace = release.stack.namespace
    missing = [
        f"cannot {verb} {resource}"
        for verb, resource in ENGINE_MAY
        if not can_i(release, verb, resource, namespace)
    ]
    extra = [
        f"may {verb} {resource}"
        for verb, resource in ENGINE_MAY_NOT
        if can_i(release, verb, resource, namespace)
    ]
    elsewhere = [
        f"may create workflows in {ns}"
        for ns in ("default", release.namespace)
        if can_i(release, "create", "workflows.argoproj.io", ns)
    ]
    return missing + extra + elsewhere


async def engine_token(release: Release) -> str:
    """A short-lived token of the engine's account (TokenRequest), as a projected token would be."""
    async with release.stack.kube() as kube:
        answer = await kube.create(
            f"/api/v1/namespaces/{release.namespace}/serviceaccounts/{RELEASE}-argo-engine/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": 3600}},
        )  # fmt: skip
    return str(answer["status"]["token"])


async def running_pods(release: Release) -> list[dict[str, Any]]:
    """The release's pods once every Deployment and StatefulSet has all its pods running."""
    async with release.stack.kube() as kube:

        async def all_running() -> bool:
            apps = f"/apis/apps/v1/namespaces/{release.namespace}"
            workloads = [*await kube.items(f"{apps}/deployments"), *await kube.items(f"{apps}/statefulsets")]
            return bool(workloads) and all(
                (w.get("status") or {}).get("readyReplicas") == w["spec"].get("replicas", 1)
                for w in workloads
            )

        await wait_for(all_running, 120, "every Deployment's and StatefulSet's pods to run", interval=0.5)
        return await kube.items(f"/api/v1/namespaces/{release.namespace}/pods")


async def test_every_object_is_admitted_and_the_pods_run_on_kwok_nodes(release: Release) -> None:
    pods = await running_pods(release)
    async with release.stack.kube() as kube:
        scaled = await kube.items(f"/apis/keda.sh/v1alpha1/namespaces/{release.namespace}/scaledobjects")
    assert pods, "no MWM pod was created"
    assert all(pod["spec"].get("nodeName", "").startswith("kwok-") for pod in pods), pods
    assert {pod["status"]["phase"] for pod in pods} == {"Running"}
    components = {pod["metadata"]["labels"]["app.kubernetes.io/component"] for pod in pods}
    consumers = {f"consumer-{name}" for name in ("discovery", "scheduler", "monitor", "exporter")}
    assert {"api", "gateway", *consumers} <= components, components
    full = any(pod["spec"].get("imagePullSecrets") for pod in pods)
    assert bool(scaled) == full, "the full values' KEDA ScaledObjects are admitted (and only theirs)"


async def test_the_engine_account_may_do_what_the_docs_say_and_nothing_more(
    release: Release, live_settings: Settings
) -> None:
    assert engine_rbac_problems(release) == []
    from tests.integration.test_argo_engine import application, job, wait_status

    engine = ArgoEngine(
        ArgoEngineSettings.of(release.stack.settings(live_settings, token=await engine_token(release)))
    )
    try:
        assert await engine.validate(application()) == []
        engine_job_id = await engine.launch(job())
        await wait_status(engine, engine_job_id, until=("running",))
        await engine.cancel(engine_job_id)
        assert (await wait_status(engine, engine_job_id))[-1].phase == "failed"
        await engine.cleanup(engine_job_id)
        assert (await engine.status(engine_job_id)).phase == "error"
    finally:
        engine.close()


@pytest.mark.parametrize("rule", [0, 1], ids=["workflows", "workflowtemplates"])
async def test_removing_a_role_rule_the_engine_needs_is_caught(
    stack_with_keda: ArgoStack, live_settings: Settings, rule: int
) -> None:
    release = install(stack_with_keda)
    try:
        rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{release.stack.namespace}"
        role = f"{rbac}/roles/{RELEASE}-argo-engine"
        async with release.stack.kube() as kube:
            current = await kube.get(role)
            assert current is not None
            rules = [r for index, r in enumerate(current["rules"]) if index != rule]
            await kube.merge_patch(role, {"rules": rules})

        async def revoked() -> bool:  # RBAC changes reach the authorizer through a watch
            return bool(engine_rbac_problems(release))

        await wait_for(revoked, 10, "the removed rule to take effect")
        problems = engine_rbac_problems(release)
        removed = "workflows.argoproj.io" if rule == 0 else "workflowtemplates.argoproj.io"
        assert problems and all(removed in problem for problem in problems), problems
        from tests.integration.test_argo_engine import application, job

        engine = ArgoEngine(
            ArgoEngineSettings.of(release.stack.settings(live_settings, token=await engine_token(release)))
        )
        try:
            if rule == 0:
                with pytest.raises(PermanentError, match="403"):
                    await engine.launch(job())
            else:
                [problem] = await engine.validate(
                    application(namespace=release.stack.namespace, workflow_template="any-template")
                )
                assert "403" in problem
        finally:
            engine.close()
    finally:
        uninstall(release)
