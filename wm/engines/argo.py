"""The ``argo`` engine: each job is one Argo Workflow, submitted to the Argo Server with the official SDK.

Entry point: ``argo = "wm.engines.argo:ArgoEngine"`` in the ``mwm.engines`` group. The workflow's shape
is built in ``wm.engines.argo_workflow``.

- The engine job id is ``<namespace>/<workflow name>``; the name is derived from the job id, so a
  second ``launch`` of a job gets 409 from Argo and returns the existing workflow's id (idempotent).
- The SDK is synchronous (urllib3): every call runs in ``asyncio.to_thread`` with a request timeout and
  ``_check_return_type=False`` (Argo answers with nulls its generated models refuse). Library errors are
  translated here: 5xx, refused connections and timeouts are ``TransientError`` (retried
  ``settings.argo.retries`` times with a short doubling backoff, then raised); 404 ``NotFound``; 409 and
  "cannot shutdown a completed workflow" (a 500 from Argo) ``Conflict``; other 4xx ``PermanentError``.
- ``status`` maps ``status.phase``; a workflow that is gone (404, for example after its TTL) is
  ``error``. A pod no node can take (the scheduler's ``Unschedulable``, e.g. too few ``nvidia.com/gpu``)
  does not wait forever: after ``settings.argo.unschedulable_timeout_s`` the workflow is stopped and
  terminated and the job fails "could not be scheduled" with the scheduler's reason; one the controller
  failed first (its ``activeDeadlineSeconds``) fails with the same words. Its ``outputs`` name the
  workflow's output artifacts (S3 key prefixes, unarchived, size 0): the caller lists the files
  themselves from the object store.
- ``cancel`` stops (exit handlers run) and then terminates the workflow; gone or finished is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import argo_workflows
import urllib3
from argo_workflows.api.workflow_service_api import WorkflowServiceApi
from argo_workflows.api.workflow_template_service_api import WorkflowTemplateServiceApi
from argo_workflows.exceptions import ApiException

from schemas.applications import ApplicationDefinition
from schemas.events import FileRef
from wm.config import ArgoSettings
from wm.domain.backoff import delay_s
from wm.engines import EnginePhase, EngineStatus, JobSpec
from wm.engines.argo_workflow import ArgoEngineSettings, Manifest, build_workflow, namespace_of, workflow_name
from wm.errors import Conflict, MwmError, NotFound, PermanentError, TransientError

PHASES: dict[str, EnginePhase] = {
    "": "pending",
    "Pending": "pending",
    "Running": "running",
    "Succeeded": "succeeded",
    "Failed": "failed",
    "Error": "error",
}
"""Argo's ``status.phase`` to the engine's phase."""


_COMPLETED = "cannot shutdown a completed workflow"
_UNSCHEDULABLE = "Unschedulable"  # Argo's pod node message prefix for the scheduler's PodScheduled=False
_LOG_ARTIFACT = "main-logs"  # Argo's archived container log, not a result
T = TypeVar("T")


def _message(error: ApiException) -> str:
    """Argo's ``message`` from its error JSON, else the HTTP reason."""
    try:
        return str(json.loads(error.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(error.reason)


def translate(error: ApiException) -> MwmError:
    """The MWM error for an Argo Server error answer."""
    status = int(error.status or 0)
    message = f"argo server answered {status}: {_message(error)}"
    if status == 404:
        return NotFound(message)
    if status == 409 or _COMPLETED in message:
        return Conflict(message)
    if status == 0 or status >= 500 or status == 429:
        return TransientError(message)
    return PermanentError(message)


def as_json(result: Any) -> Manifest:
    """An SDK result as plain JSON: the top level is a model, what is below it already plain dicts."""
    if hasattr(result, "to_dict"):
        return dict(result.to_dict())
    return dict(result) if isinstance(result, dict) else {}


def sdk_client(settings: ArgoSettings) -> argo_workflows.ApiClient:
    """An SDK client for the configured server: bearer token, TLS verification, no hidden retries.

    The SDK ignores ``Configuration(access_token=...)``; only ``api_key["BearerToken"]`` with the
    ``Bearer`` prefix puts the ``Authorization`` header on a request.
    """
    configuration = argo_workflows.Configuration(host=settings.server_url.rstrip("/"))
    if settings.token:
        configuration.api_key = {"BearerToken": settings.token}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
    configuration.verify_ssl = settings.verify_tls
    configuration.ssl_ca_cert = settings.ca_cert or None
    configuration.retries = 0
    return argo_workflows.ApiClient(configuration)


def split_id(engine_job_id: str, default_namespace: str) -> tuple[str, str]:
    """``(namespace, name)`` from an engine job id ``namespace/name`` (a bare name: default namespace)."""
    namespace, _, name = engine_job_id.rpartition("/")
    return namespace or default_namespace, name


def artifact_outputs(workflow: Manifest, default_bucket: str) -> list[FileRef]:
    """The S3 output artifacts the nodes report (one per key, logs left out), as size-0 references."""
    nodes = (workflow.get("status") or {}).get("nodes") or {}
    keys: dict[tuple[str, str], None] = {}
    for node in nodes.values():
        for artifact in ((node or {}).get("outputs") or {}).get("artifacts") or []:
            s3 = (artifact or {}).get("s3") or {}
            if s3.get("key") and artifact.get("name") != _LOG_ARTIFACT:
                keys[(s3.get("bucket") or default_bucket, s3["key"])] = None
    return [
        FileRef(bucket=bucket, key=key, size=0, content_type="application/octet-stream")
        for bucket, key in keys
    ]


def unscheduled_pod(workflow: Manifest) -> tuple[str, datetime] | None:
    """(message, since) of a pod node no node was found for: the scheduler's reason while it waits, the
    controller's once it failed it (a pod node without ``hostNodeName`` never ran anywhere)."""
    nodes = (workflow.get("status") or {}).get("nodes") or {}
    for node in nodes.values():
        if (node or {}).get("type") != "Pod" or node.get("hostNodeName"):
            continue
        message = str(node.get("message") or "")
        waiting = node.get("phase") == "Pending" and message.startswith(_UNSCHEDULABLE)
        if waiting or node.get("phase") in ("Failed", "Error"):
            # A pod node that never ran has no startedAt of its own: the workflow's start is the bound.
            started = str(node.get("startedAt") or (workflow.get("status") or {}).get("startedAt") or "")
            return message, datetime.fromisoformat(started) if started else datetime.now(UTC)
    return None


class ArgoEngine:
    """The Argo Workflows engine (an ``Engine``); the ``mwm.engines`` entry point, built with its settings."""

    name = "argo"
    settings_type = ArgoEngineSettings

    def __init__(self, settings: ArgoEngineSettings) -> None:
        self._settings = settings
        self._client = sdk_client(settings.argo)
        self._workflows = WorkflowServiceApi(self._client)
        self._templates = WorkflowTemplateServiceApi(self._client)

    def close(self) -> None:
        """Close the SDK's connection pool."""
        self._client.rest_client.pool_manager.clear()
        self._client.close()

    async def _call(self, method: Callable[..., T], *args: Any) -> T:
        """``method(*args)`` in a thread, errors translated; transient ones retried (bounded)."""
        call = functools.partial(
            method,
            *args,
            _check_return_type=False,
            _spec_property_naming=True,
            _request_timeout=self._settings.argo.request_timeout_s,
        )
        for attempt in range(self._settings.argo.retries + 1):
            try:
                return await asyncio.to_thread(_translated, call)
            except TransientError:
                if attempt == self._settings.argo.retries:
                    raise
                argo = self._settings.argo
                await asyncio.sleep(delay_s(attempt + 1, argo.retry_initial_delay_s, argo.retry_max_delay_s))
        raise AssertionError("unreachable")

    async def validate(self, application: ApplicationDefinition) -> list[str]:
        """Problems that stop ``application`` from running on Argo; the server's own checks included."""
        options = application.engine.argo
        template = options.workflow_template if options else None
        if not template and not application.map.image:
            return ["map.image is required for the argo engine (or name a workflow_template)"]
        try:
            if template:
                return await self._template_problems(application, template)
            return await self._lint_problems(application)
        except TransientError as error:
            return [f"argo server at {self._settings.argo.server_url} is unreachable: {error}"]
        except MwmError as error:
            return [str(error)]

    async def _template_problems(self, application: ApplicationDefinition, template: str) -> list[str]:
        namespace = namespace_of(application, self._settings)
        try:
            await self._call(self._templates.get_workflow_template, namespace, template)
        except NotFound:
            return [f"workflow template {template} not found in namespace {namespace}"]
        return []

    async def _lint_problems(self, application: ApplicationDefinition) -> list[str]:
        job = _probe_job(application)
        namespace = namespace_of(application, self._settings)
        body = {"namespace": namespace, "workflow": build_workflow(job, self._settings, datetime.now(UTC))}
        try:
            await self._call(self._workflows.lint_workflow, namespace, body)
        except PermanentError as error:
            return [f"argo lint rejected the workflow: {error}"]
        return []

    async def launch(self, job: JobSpec) -> str:
        """Submit the job's workflow; returns ``namespace/name``. A workflow already there is success."""
        manifest = build_workflow(job, self._settings, datetime.now(UTC))
        namespace, name = namespace_of(job.application, self._settings), workflow_name(job.job_id)
        body = {"namespace": namespace, "workflow": manifest}
        try:
            await self._call(self._workflows.create_workflow, namespace, body)
        except Conflict:  # launched before (a redelivery, a crash after submit): the same one
            pass
        except NotFound as error:  # what the workflow refers to (its WorkflowTemplate) does not exist
            raise PermanentError(f"argo server rejected the workflow: {error}") from error
        return f"{namespace}/{name}"

    async def status(self, engine_job_id: str) -> EngineStatus:
        """The workflow's phase and message; a missing workflow is ``error``."""
        namespace, name = split_id(engine_job_id, self._settings.argo.namespace)
        try:
            workflow = as_json(await self._call(self._workflows.get_workflow, namespace, name))
        except NotFound:
            return EngineStatus("error", f"workflow {name} not found in namespace {namespace}")
        status = workflow.get("status") or {}
        phase = PHASES.get(status.get("phase") or "", "error")
        message = status.get("message") or ""
        unplaced = unscheduled_pod(workflow)
        if unplaced and phase in ("pending", "running"):
            pod_message, since = unplaced
            waited = (datetime.now(UTC) - since).total_seconds()
            if waited < self._settings.argo.unschedulable_timeout_s:
                return EngineStatus(phase, pod_message)
            await self.cancel(engine_job_id)
            return EngineStatus("failed", f"could not be scheduled in {waited:.0f} s: {pod_message}")
        if unplaced and phase in ("failed", "error"):
            return EngineStatus(phase, f"could not be scheduled: {unplaced[0]}")
        bucket = self._settings.object_store.bucket
        outputs = artifact_outputs(workflow, bucket) if phase == "succeeded" else []
        return EngineStatus(phase, message, outputs)

    async def cancel(self, engine_job_id: str) -> None:
        """Stop, then terminate the workflow; one that is gone or already finished is left as it is."""
        namespace, name = split_id(engine_job_id, self._settings.argo.namespace)
        body = {"name": name, "namespace": namespace}
        for action in (self._workflows.stop_workflow, self._workflows.terminate_workflow):
            try:
                await self._call(action, namespace, name, body)
            except (NotFound, Conflict):
                return

    async def cleanup(self, engine_job_id: str) -> None:
        """Delete the workflow (its pods go with it); one already deleted is fine."""
        namespace, name = split_id(engine_job_id, self._settings.argo.namespace)
        with contextlib.suppress(NotFound):
            await self._call(self._workflows.delete_workflow, namespace, name)


def _translated(call: Callable[[], T]) -> T:
    """Run one SDK call (in a worker thread), raising only ``wm.errors`` types."""
    try:
        return call()
    except ApiException as error:
        raise translate(error) from error
    except urllib3.exceptions.HTTPError as error:
        raise TransientError(f"argo server unreachable: {type(error).__name__}: {error}") from error


def _probe_job(application: ApplicationDefinition) -> JobSpec:
    """A stand-in job for validation: the workflow the application would get, on dummy keys."""
    return JobSpec(
        job_id="mwm-validate",
        correlation_id="validate",
        application=application,
        input_prefix="validate/input",
        output_prefix="validate/output",
        deadline=datetime.now(UTC) + timedelta(seconds=application.map.timeout_s),
    )
