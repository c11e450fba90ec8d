"""The real Argo stack the Argo tests use (``scripts/argo-stack``), and what no container does there.

``scripts/argo-stack up`` runs etcd, kube-apiserver, kube-scheduler, kube-controller-manager, kwok, Argo's
workflow-controller and Argo Server on loopback. kwok moves pods through their phases, but no container
ever runs: Argo's executor (the ``wait`` container) never uploads a step's outputs nor reports them, so a
template with outputs would stay Running. ``Executor`` does both as the executor would: it writes the
step's files to S3 where the output artifact says they go, then creates the ``WorkflowTaskResult`` (named
after the node, labelled ``report-outputs-completed``) the controller waits for.

Pods follow annotations set in a template's ``metadata`` (the kwok stages in scripts/argo-stack.d):
``kwok.test/fail: "true"`` fails the ``main`` container (exit 1), ``kwok.test/delay: 600s`` keeps the pod
running that long.

A test that needs the stack and cannot reach it FAILS (``argo_stack()``), never skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httpx

from devkit.services import REPO
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings

Json = dict[str, Any]
ARGO_GROUP = "/apis/argoproj.io/v1alpha1"
LABEL_WORKFLOW = "workflows.argoproj.io/workflow"
ANNOTATION_NODE_ID = "workflows.argoproj.io/node-id"
LABEL_OUTPUTS_REPORTED = "workflows.argoproj.io/report-outputs-completed"


def stack_command(*args: str, timeout: float = 180) -> str:
    """Run ``scripts/argo-stack ARGS`` for this environment's stack; its standard output."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "argo-stack"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"scripts/argo-stack {' '.join(args)} failed: {result.stderr[-2000:]}")
    return result.stdout


@dataclass(frozen=True)
class ArgoStack:
    """Addresses and credentials of the running stack (from ``scripts/argo-stack env``)."""

    namespace: str
    kube_url: str
    kube_ca: str
    admin_token: str
    kubeconfig: str
    kubectl: str
    keda_crds: Path
    argo_url: str
    argo_ca: str

    def settings(self, settings: Settings, **argo: Any) -> Settings:
        """``settings`` with the engine pointed at this stack's Argo Server (admin token, quick retries)."""
        values = {
            "server_url": self.argo_url,
            "ca_cert": self.argo_ca,
            "token": self.admin_token,
            "namespace": self.namespace,
            "retries": 2,
            "request_timeout_s": 5.0,
            **argo,
        }
        return settings.model_copy(update={"argo": settings.argo.model_copy(update=values)})

    def kube(self, token: str | None = None) -> Kube:
        """A client of the API server (the admin's token unless another is given)."""
        return Kube(self, token or self.admin_token)


@cache
def _stack() -> ArgoStack | str:
    try:
        values = dict(
            line.split("=", 1) for line in stack_command("env", timeout=30).splitlines() if "=" in line
        )
    except AssertionError as error:
        return str(error)
    stack = ArgoStack(
        namespace=values["MWM_ARGO_STACK_NAMESPACE"],
        kube_url=values["MWM_ARGO_STACK_KUBE_URL"],
        kube_ca=values["MWM_ARGO_STACK_KUBE_CA"],
        admin_token=values["MWM_ARGO_STACK_KUBE_TOKEN"],
        kubeconfig=values["MWM_ARGO_STACK_KUBECONFIG"],
        kubectl=values["MWM_ARGO_STACK_KUBECTL"],
        keda_crds=Path(values["MWM_ARGO_STACK_KEDA_CRDS"]),
        argo_url=values["MWM_ARGO_STACK_ARGO_URL"],
        argo_ca=values["MWM_ARGO_STACK_ARGO_CA"],
    )
    return stack if stack.admin_token else "no admin token: the stack was never started"


def argo_stack() -> ArgoStack:
    """The running stack; ``AssertionError`` (a test fails, never skips) when it is not up."""
    stack = _stack()
    if isinstance(stack, str):
        raise AssertionError(f"Argo stack unavailable ({stack}); start it with `bash scripts/argo-stack up`")
    probe = f"{stack.argo_url}/api/v1/workflows/{stack.namespace}"
    try:
        answer = httpx.get(
            probe,
            headers={"Authorization": f"Bearer {stack.admin_token}"},
            verify=ssl.create_default_context(cafile=stack.argo_ca),
            timeout=10,
        )
    except httpx.HTTPError as error:
        raise AssertionError(
            f"Argo Server at {stack.argo_url} unreachable ({error}): `bash scripts/argo-stack up`"
        ) from error
    if answer.status_code != 200:
        raise AssertionError(
            f"Argo Server at {stack.argo_url} answered {answer.status_code}: {answer.text[:300]}"
        )
    return stack


class Kube:
    """The few Kubernetes API calls the tests make, as JSON over HTTPS (bearer token)."""

    def __init__(self, stack: ArgoStack, token: str) -> None:
        self._client = httpx.AsyncClient(
            base_url=stack.kube_url,
            verify=ssl.create_default_context(cafile=stack.kube_ca),
            headers={"Authorization": f"Bearer {token}"},
            timeout=20,
        )

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call; a 429 (the API server's priority and fairness shedding load) is asked again after the
        ``Retry-After`` it gives, as client-go does."""
        for _ in range(10):
            answer = await self._client.request(method, path, **kwargs)
            if answer.status_code != 429:
                return answer
            await asyncio.sleep(min(float(answer.headers.get("Retry-After", "1")), 2.0))
        return answer

    async def get(self, path: str, **params: str) -> Json | None:
        """The object (or list) at ``path``; ``None`` when it does not exist."""
        answer = await self._request("GET", path, params=params)
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        return dict(answer.json())

    async def create(self, path: str, body: Json) -> Json:
        """POST ``body`` to the collection ``path``; an object already there is returned as it is."""
        answer = await self._request("POST", path, json=body)
        if answer.status_code == 409:
            return await self.get(f"{path}/{body['metadata']['name']}") or {}
        answer.raise_for_status()
        return dict(answer.json())

    async def delete(self, path: str) -> None:
        """DELETE ``path`` (foreground); gone already is fine."""
        answer = await self._request(
            "DELETE",
            path,
            json={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"},
        )
        if answer.status_code != 404:
            answer.raise_for_status()

    async def delete_all(self, path: str, selector: str) -> None:
        """Delete every object of the collection ``path`` matching the label selector."""
        answer = await self._request("DELETE", path, params={"labelSelector": selector})
        answer.raise_for_status()

    async def merge_patch(self, path: str, patch: Json) -> Json:
        """A JSON merge patch of the object at ``path``."""
        answer = await self._request(
            "PATCH", path, json=patch, headers={"Content-Type": "application/merge-patch+json"}
        )
        answer.raise_for_status()
        return dict(answer.json())

    async def items(self, path: str, selector: str = "") -> list[Json]:
        """The items of a list call, with an optional label selector."""
        listing = await self.get(path, **({"labelSelector": selector} if selector else {}))
        return list((listing or {}).get("items") or [])


def workflow_path(namespace: str, name: str = "") -> str:
    """API path of the workflows of ``namespace`` (or of one)."""
    return f"{ARGO_GROUP}/namespaces/{namespace}/workflows" + (f"/{name}" if name else "")


async def forget_workflows(stack: ArgoStack, application: str) -> None:
    """Delete the workflows an earlier run left of ``application``.

    Job ids derive from the study (``job_id_for``), so a rerun on a fresh database would otherwise meet
    its predecessor's workflow (kept for the TTL) and take it for its own.
    """
    async with stack.kube() as kube:
        await kube.delete_all(workflow_path(stack.namespace), f"mwm.application={application}")


def argo_application(
    name: str, ae_title: str, sinks: list[str] | None = None, quiet_period_s: float = 0.5
) -> Json:
    """An application definition run by Argo (its image never runs: ``Executor`` does its work)."""
    return {
        "name": name,
        "version": "1.0.0",
        "ae_titles": [ae_title],
        "discovery": {"quiet_period_s": quiet_period_s, "filters": {"modalities": ["CT"]}},
        "map": {"image": "registry/echo:1", "timeout_s": 300},
        "engine": {"name": "argo", "argo": {}},
        "sinks": sinks or [],
    }


Produce = Callable[[str, str, ObjectStore], Awaitable[None]]
"""``produce(input_prefix, output_prefix, objects)`` writes a step's output files (the MAP's work)."""


async def copy_inputs(input_prefix: str, output_prefix: str, objects: ObjectStore) -> None:
    """The default step: every input file, copied to the output (an echo application)."""
    for ref in await objects.list(input_prefix + "/"):
        await objects.copy(ref.key, output_prefix + ref.key[len(input_prefix) :])


async def no_outputs(input_prefix: str, output_prefix: str, objects: ObjectStore) -> None:
    """A step that writes nothing."""


def _templates(workflow: Json) -> dict[str, Json]:
    status, spec = workflow.get("status") or {}, workflow.get("spec") or {}
    stored = (status.get("storedWorkflowTemplateSpec") or {}).get("templates") or []
    return {template["name"]: template for template in [*spec.get("templates", []), *stored]}


def _artifact_key(artifacts: list[Json], name: str) -> str | None:
    for artifact in artifacts:
        if artifact.get("name") == name and artifact.get("s3", {}).get("key"):
            return str(artifact["s3"]["key"])
    return None


@dataclass
class Executor:
    """What Argo's executor does for each started pod of the matching workflows: write, then report outputs.

    ``produce`` is the step's work; ``selector`` picks the workflows (a label selector); every pod node is
    reported once. Run it with ``async with executor.running():``.
    """

    stack: ArgoStack
    settings: Settings
    selector: str = ""
    produce: Produce = copy_inputs
    reported: set[str] = field(default_factory=set)

    async def report_once(self, kube: Kube, objects: ObjectStore) -> None:
        """One pass over the workflows: report every started pod node not reported yet.

        A node counts as started when its pod runs or ran, whatever the node's phase says: when kwok moves
        a pod from Pending to Succeeded between two of the controller's passes, the controller leaves the
        node Pending until its outputs are reported, so waiting for the node's phase would wait forever.
        """
        pods = {
            (pod["metadata"].get("annotations") or {}).get(ANNOTATION_NODE_ID): (pod.get("status") or {}).get(
                "phase"
            )
            for pod in await kube.items(f"api/v1/namespaces/{self.stack.namespace}/pods", LABEL_WORKFLOW)
        }
        for workflow in await kube.items(workflow_path(self.stack.namespace), self.selector):
            templates = _templates(workflow)
            for node_id, node in ((workflow.get("status") or {}).get("nodes") or {}).items():
                phases = {node.get("phase"), pods.get(node_id)}
                started = node.get("type") == "Pod" and bool(phases & {"Running", "Succeeded", "Failed"})
                if started and node_id not in self.reported:
                    await self._report(
                        kube, objects, workflow, node_id, templates.get(node.get("templateName", ""))
                    )
                    self.reported.add(node_id)

    async def _report(
        self, kube: Kube, objects: ObjectStore, workflow: Json, node_id: str, template: Json | None
    ) -> None:
        outputs = (template or {}).get("outputs") or {}
        input_key = _artifact_key(((template or {}).get("inputs") or {}).get("artifacts") or [], "input")
        output_key = _artifact_key(outputs.get("artifacts") or [], "output")
        if input_key and output_key:
            await self.produce(input_key, output_key, objects)
        name = workflow["metadata"]["name"]
        result = {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "WorkflowTaskResult",
            "metadata": {
                "name": node_id,
                "labels": {LABEL_WORKFLOW: name, LABEL_OUTPUTS_REPORTED: "true"},
                "ownerReferences": [
                    {
                        "apiVersion": "argoproj.io/v1alpha1",
                        "kind": "Workflow",
                        "name": name,
                        "uid": workflow["metadata"]["uid"],
                    }
                ],
            },
            "outputs": {"artifacts": outputs.get("artifacts") or [], "exitCode": "0"},
        }
        await kube.create(f"{ARGO_GROUP}/namespaces/{self.stack.namespace}/workflowtaskresults", result)

    @contextlib.asynccontextmanager
    async def running(self, interval: float = 0.2) -> AsyncIterator[Executor]:
        """Report in the background for the duration of the block."""
        stop = asyncio.Event()

        async def loop() -> None:
            async with self.stack.kube() as kube, ObjectStore(self.settings.object_store) as objects:
                while not stop.is_set():
                    try:
                        await self.report_once(kube, objects)
                    except Exception as exc:  # an API or S3 hiccup must not end the executor: next pass
                        print(f"executor pass failed, retrying: {exc!r}", file=sys.stderr)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval)

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            stop.set()
            await task
