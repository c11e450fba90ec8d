"""The Workflow a job becomes on Argo: pure, no server."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.applications import ApplicationDefinition
from wm.config import Settings
from wm.engines import JobSpec
from wm.engines.argo_workflow import ArgoEngineSettings, build_workflow, label_value, workflow_name

NOW = datetime(2025, 1, 1, tzinfo=UTC)
LABEL = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def application(**overrides: Any) -> ApplicationDefinition:
    """An application for the Argo engine; ``overrides`` replace top-level fields."""
    document: dict[str, Any] = {
        "name": "liver-seg",
        "version": "1.0",
        "map": {
            "image": "registry/liver:1",
            "command": ["python", "-m", "app"],
            "environment": {"A": "1"},
            "cpu": 2,
            "memory": "4Gi",
            "gpu": 1,
            "timeout_s": 600,
        },
        "engine": {"name": "argo", "argo": {"namespace": "imaging"}},
    }
    return ApplicationDefinition.model_validate({**document, **overrides})


def job(app: ApplicationDefinition | None = None, deadline_in_s: float = 3600, **overrides: Any) -> JobSpec:
    """A job for ``app`` whose deadline is ``deadline_in_s`` after ``NOW``."""
    values: dict[str, Any] = {
        "job_id": "job-1234",
        "correlation_id": "corr/ID 42",
        "application": app or application(),
        "input_prefix": "jobs/job-1234/input/",
        "output_prefix": "jobs/job-1234/output",
        "deadline": NOW + timedelta(seconds=deadline_in_s),
    }
    return JobSpec(**{**values, **overrides})


@pytest.fixture(name="settings")
def engine_settings(settings: Settings) -> ArgoEngineSettings:
    """What the Argo engine is given of this test's settings."""
    return ArgoEngineSettings.of(settings)


def template(manifest: dict[str, Any]) -> dict[str, Any]:
    """The generated workflow's only template."""
    templates: list[dict[str, Any]] = manifest["spec"]["templates"]
    assert len(templates) == 1
    return templates[0]


def test_generated_workflow_runs_the_map_container(settings: ArgoEngineSettings) -> None:
    manifest = build_workflow(job(), settings, NOW)
    assert manifest["kind"] == "Workflow"
    assert manifest["spec"]["entrypoint"] == template(manifest)["name"]
    container = template(manifest)["container"]
    assert container["image"] == "registry/liver:1"
    assert container["args"] == ["python", "-m", "app"]
    assert container["resources"] == {"limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}}


def test_environment_has_the_map_paths_and_they_win(settings: ArgoEngineSettings) -> None:
    app = application(map={"image": "x", "environment": {"A": "1", "MONAI_INPUTPATH": "/elsewhere"}})
    container = template(build_workflow(job(app), settings, NOW))["container"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env == {
        "A": "1",
        "MONAI_INPUTPATH": "/var/monai/input",
        "MONAI_OUTPUTPATH": "/var/monai/output",
        "HOLOSCAN_INPUT_PATH": "/var/monai/input",
        "HOLOSCAN_OUTPUT_PATH": "/var/monai/output",
    }


def test_no_limits_and_no_args_when_the_application_sets_none(settings: ArgoEngineSettings) -> None:
    container = template(build_workflow(job(application(map={"image": "x"})), settings, NOW))["container"]
    assert "resources" not in container
    assert "args" not in container


def test_artifacts_point_at_the_job_prefixes_in_the_object_store(settings: ArgoEngineSettings) -> None:
    store = settings.object_store
    generated = template(build_workflow(job(), settings, NOW))
    [source] = generated["inputs"]["artifacts"]
    [result] = generated["outputs"]["artifacts"]
    assert (source["name"], source["path"]) == ("input", "/var/monai/input")
    assert (result["name"], result["path"]) == ("output", "/var/monai/output")
    assert (source["s3"]["key"], result["s3"]["key"]) == ("jobs/job-1234/input", "jobs/job-1234/output")
    assert result["archive"] == {"none": {}}
    assert (
        source["s3"] | {"key": None}
        == result["s3"] | {"key": None}
        == {
            "key": None,
            "bucket": store.bucket,
            "endpoint": store.endpoint,
            "insecure": not store.secure,
            "accessKeySecret": {"name": "mwm-s3", "key": "accessKey"},
            "secretKeySecret": {"name": "mwm-s3", "key": "secretKey"},
        }
    )


def test_metadata_names_and_labels_the_workflow_after_the_job(settings: ArgoEngineSettings) -> None:
    metadata = build_workflow(job(), settings, NOW)["metadata"]
    assert metadata["name"] == "job-1234"
    assert metadata["namespace"] == "imaging"
    assert metadata["labels"]["mwm.job-id"] == "job-1234"
    assert metadata["labels"]["mwm.application"] == "liver-seg"
    assert LABEL.match(metadata["labels"]["mwm.correlation-id"])


def test_default_namespace_without_argo_options(settings: ArgoEngineSettings) -> None:
    app = application(engine={"name": "argo"})
    assert build_workflow(job(app), settings, NOW)["metadata"]["namespace"] == settings.argo.namespace


def test_deadline_is_the_timeout_but_never_past_the_job_deadline(settings: ArgoEngineSettings) -> None:
    assert build_workflow(job(), settings, NOW)["spec"]["activeDeadlineSeconds"] == 600
    assert build_workflow(job(deadline_in_s=90.2), settings, NOW)["spec"]["activeDeadlineSeconds"] == 91
    assert build_workflow(job(deadline_in_s=-5), settings, NOW)["spec"]["activeDeadlineSeconds"] == 1


def test_ttl_strategy_and_service_account_from_settings_and_application(settings: ArgoEngineSettings) -> None:
    app = application(engine={"name": "argo", "argo": {"service_account": "mwm-runner"}})
    spec = build_workflow(job(app), settings, NOW)["spec"]
    assert spec["ttlStrategy"] == {"secondsAfterSuccess": 3600, "secondsAfterFailure": 86400}
    assert spec["serviceAccountName"] == "mwm-runner"
    assert build_workflow(job(), settings, NOW)["spec"]["serviceAccountName"] == "mwm-workflow"
    no_default = settings.model_copy(
        update={"argo": settings.argo.model_copy(update={"workflow_service_account": ""})}
    )
    assert "serviceAccountName" not in build_workflow(job(), no_default, NOW)["spec"]


def test_artifacts_name_the_endpoint_the_pods_reach_when_one_is_set(settings: ArgoEngineSettings) -> None:
    for_pods = settings.model_copy(
        update={"argo": settings.argo.model_copy(update={"artifact_endpoint": "minio.storage:9000"})}
    )
    generated = template(build_workflow(job(), for_pods, NOW))
    endpoints = {
        a["s3"]["endpoint"] for a in generated["inputs"]["artifacts"] + generated["outputs"]["artifacts"]
    }
    assert endpoints == {"minio.storage:9000"} != {settings.object_store.endpoint}


def test_template_mode_refers_to_the_template_with_artifact_arguments(settings: ArgoEngineSettings) -> None:
    app = application(engine={"name": "argo", "argo": {"workflow_template": "liver-seg-v1"}})
    spec = build_workflow(job(app), settings, NOW)["spec"]
    assert spec["workflowTemplateRef"] == {"name": "liver-seg-v1"}
    assert "templates" not in spec and "entrypoint" not in spec
    assert spec["arguments"]["parameters"] == [{"name": "job-id", "value": "job-1234"}]
    keys = {artifact["name"]: artifact["s3"]["key"] for artifact in spec["arguments"]["artifacts"]}
    assert keys == {"input": "jobs/job-1234/input", "output": "jobs/job-1234/output"}
    assert spec["activeDeadlineSeconds"] == 600


@pytest.mark.parametrize("job_id", ["Bucket_ABC:1.2.3", "x" * 80, "--", "a.b"])
def test_workflow_name_is_a_deterministic_dns_label(job_id: str) -> None:
    name = workflow_name(job_id)
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name)
    assert name == workflow_name(job_id)
    assert workflow_name(job_id + "x") != name


@pytest.mark.parametrize("value", ["corr/ID 42", "-lead", "y" * 100, "1.2.840.10008", "ok_value"])
def test_label_values_are_valid(value: str) -> None:
    cleaned = label_value(value)
    assert LABEL.match(cleaned) and len(cleaned) <= 63
    if LABEL.match(value) and len(value) <= 63:
        assert cleaned == value
