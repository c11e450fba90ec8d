"""The Argo Workflow a job becomes: pure functions from a ``JobSpec`` and the settings to a manifest.

Two shapes:

- generated (no ``engine.argo.workflow_template``): one container template ``map`` running
  ``map.image`` with ``map.command`` as its ``args`` (like ``docker run IMAGE ARGS...``, so the image's
  entrypoint stays: the MAP specification lets a MAP start its application through its ENTRYPOINT, CMD
  or both, and puts the packager's method of accessing the packaged files (``show``, ``export``) in
  front of the application, so replacing the entrypoint with ``command`` could bypass it), the
  application's environment plus the MAP paths, limits for cpu, memory and
  ``nvidia.com/gpu``; the input artifact ``input`` (the job's input prefix, a directory) at
  ``/var/monai/input`` and the output artifact ``output`` from ``/var/monai/output`` to the job's output
  prefix, unarchived so each file becomes one object;
- template (``workflow_template`` set): ``workflowTemplateRef`` to that WorkflowTemplate, with the
  arguments ``input`` / ``output`` (artifacts at the same S3 keys) and the parameter ``job-id``.

Both carry the labels ``mwm.job-id``, ``mwm.correlation-id`` and ``mwm.application``, the
``serviceAccountName`` the application names or else ``settings.argo.workflow_service_account`` (the
chart's ``<release>-workflow``, with what Argo's executor needs; empty: the namespace's default), an
``activeDeadlineSeconds`` (the application's timeout, shortened so it never runs past the job's
deadline) and a TTL strategy. The name is derived from the job id, so a second launch of the same job
collides (409) instead of starting a twin.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime
from typing import Any

from schemas.applications import ApplicationDefinition
from wm.config import ArgoSettings
from wm.engines import JobSpec
from wm.plugins import PluginSettings

INPUT_PATH = "/var/monai/input"
OUTPUT_PATH = "/var/monai/output"
ENTRYPOINT = "map"
LABEL_JOB = "mwm.job-id"
LABEL_CORRELATION = "mwm.correlation-id"
LABEL_APPLICATION = "mwm.application"

Manifest = dict[str, Any]

_NAME_MAX = 63
_NOT_NAME = re.compile(r"[^a-z0-9-]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9._-]+")
_VALID_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ArtifactStore(PluginSettings):
    """Where the workflows' artifacts live: MWM's bucket, not its keys (the pods read the artifact secret)."""

    endpoint: str
    secure: bool
    bucket: str


class ArgoEngineSettings(PluginSettings):
    """What the Argo engine reads of MWM's settings: its own section and where the artifacts are."""

    argo: ArgoSettings
    object_store: ArtifactStore


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:10]


def workflow_name(job_id: str) -> str:
    """The workflow's name: the job id when it is a DNS label, else a cleaned prefix plus a short hash."""
    if _VALID_NAME.match(job_id):
        return job_id
    stem = _NOT_NAME.sub("-", job_id.lower()).strip("-")[: _NAME_MAX - 11].rstrip("-")
    return f"{stem}-{_digest(job_id)}" if stem else f"mwm-{_digest(job_id)}"


def label_value(value: str) -> str:
    """``value`` as a valid Kubernetes label value (63 characters, alphanumeric at both ends)."""
    cleaned = _NOT_LABEL.sub("-", value).strip("-_.")
    if cleaned == value and len(value) <= _NAME_MAX:
        return value
    return f"{cleaned[: _NAME_MAX - 11].strip('-_.')}-{_digest(value)}".lstrip("-")


def namespace_of(application: ApplicationDefinition, settings: ArgoEngineSettings) -> str:
    """The application's Argo namespace, or the default one when it has no Argo options."""
    options = application.engine.argo
    return options.namespace if options else settings.argo.namespace


def active_deadline_s(job: JobSpec, now: datetime) -> int:
    """The application's timeout, but never past the job's deadline (at least one second)."""
    remaining = math.ceil((job.deadline - now).total_seconds())
    return max(1, min(job.application.map.timeout_s, remaining))


def s3_location(key: str, settings: ArgoEngineSettings) -> Manifest:
    """An S3 artifact location in the MWM bucket; credentials from the artifact secret.

    The endpoint is the one the workflow pods reach (``argo.artifact_endpoint``), which in another
    namespace or cluster is often not MWM's own ``object_store.endpoint``.
    """
    store, secret = settings.object_store, settings.argo.artifact_secret
    return {
        "key": key.rstrip("/"),
        "bucket": store.bucket,
        "endpoint": settings.argo.artifact_endpoint or store.endpoint,
        "insecure": not store.secure,
        "accessKeySecret": {"name": secret, "key": "accessKey"},
        "secretKeySecret": {"name": secret, "key": "secretKey"},
    }


def _environment(job: JobSpec) -> list[dict[str, str]]:
    paths = {
        "MONAI_INPUTPATH": INPUT_PATH,
        "MONAI_OUTPUTPATH": OUTPUT_PATH,
        "HOLOSCAN_INPUT_PATH": INPUT_PATH,
        "HOLOSCAN_OUTPUT_PATH": OUTPUT_PATH,
    }
    merged = {**job.application.map.environment, **paths}
    return [{"name": name, "value": value} for name, value in merged.items()]


def _limits(job: JobSpec) -> dict[str, str]:
    spec = job.application.map
    limits = {"cpu": f"{spec.cpu:g}" if spec.cpu else "", "memory": spec.memory or ""}
    if spec.gpu:
        limits["nvidia.com/gpu"] = str(spec.gpu)
    return {name: value for name, value in limits.items() if value}


def _container(job: JobSpec) -> Manifest:
    container: Manifest = {"image": job.application.map.image or "", "env": _environment(job)}
    if job.application.map.command:
        container["args"] = list(job.application.map.command)
    limits = _limits(job)
    if limits:
        container["resources"] = {"limits": limits}
    return container


def _generated_spec(job: JobSpec, settings: ArgoEngineSettings) -> Manifest:
    template = {
        "name": ENTRYPOINT,
        "inputs": {
            "artifacts": [
                {"name": "input", "path": INPUT_PATH, "s3": s3_location(job.input_prefix, settings)}
            ]
        },
        "outputs": {
            "artifacts": [
                {
                    "name": "output",
                    "path": OUTPUT_PATH,
                    "archive": {"none": {}},
                    "s3": s3_location(job.output_prefix, settings),
                }
            ]
        },
        "container": _container(job),
    }
    return {"entrypoint": ENTRYPOINT, "templates": [template]}


def _template_ref_spec(job: JobSpec, settings: ArgoEngineSettings, template: str) -> Manifest:
    return {
        "workflowTemplateRef": {"name": template},
        "arguments": {
            "parameters": [{"name": "job-id", "value": job.job_id}],
            "artifacts": [
                {"name": "input", "s3": s3_location(job.input_prefix, settings)},
                {"name": "output", "s3": s3_location(job.output_prefix, settings)},
            ],
        },
    }


def job_labels(job: JobSpec) -> dict[str, str]:
    """The labels that tie a workflow to its MWM job."""
    return {
        LABEL_JOB: label_value(job.job_id),
        LABEL_CORRELATION: label_value(job.correlation_id),
        LABEL_APPLICATION: label_value(job.application.name),
    }


def build_workflow(job: JobSpec, settings: ArgoEngineSettings, now: datetime) -> Manifest:
    """The Workflow manifest (Argo's JSON shape) for ``job``; ``now`` fixes the deadline arithmetic."""
    options = job.application.engine.argo
    spec: Manifest = {
        "activeDeadlineSeconds": active_deadline_s(job, now),
        "ttlStrategy": {
            "secondsAfterSuccess": settings.argo.ttl_after_success_s,
            "secondsAfterFailure": settings.argo.ttl_after_failure_s,
        },
    }
    service_account = (options and options.service_account) or settings.argo.workflow_service_account
    if service_account:
        spec["serviceAccountName"] = service_account
    if options and options.workflow_template:
        spec.update(_template_ref_spec(job, settings, options.workflow_template))
    else:
        spec.update(_generated_spec(job, settings))
    metadata = {
        "name": workflow_name(job.job_id),
        "namespace": namespace_of(job.application, settings),
        "labels": job_labels(job),
    }
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": metadata, "spec": spec}
