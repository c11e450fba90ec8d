"""Validate rendered Kubernetes manifests offline.

Built-in kinds are checked, strictly (unknown fields rejected), against the Kubernetes JSON schemas that
the ``kubernetes-validate`` package vendors, for each requested Kubernetes version. KEDA's custom
resources (ScaledObject, TriggerAuthentication) and the Prometheus Operator's PrometheusRule have no
vendored schema: they are checked against the small structural schemas below, subsets of their CRDs.
Any other kind is an error.

Usage: ``python helm/validate_manifests.py [-k 1.25 -k 1.37] FILE...``; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import yaml

_STR: dict[str, Any] = {"type": "string", "minLength": 1}
_NAME_REF: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "kind": _STR},
    "additionalProperties": False,
}
_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
        "namespace": _STR,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _custom_resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The schema of a custom resource of ``kind`` whose ``spec`` follows ``spec``."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _custom_resource(
        "keda.sh/v1alpha1",
        "ScaledObject",
        {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": _STR,
                        "kind": _STR,
                        "name": _STR,
                        "envSourceContainerName": _STR,
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": _STR,
                            "name": _STR,
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": _NAME_REF,
                        },
                    },
                },
            },
        },
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _custom_resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": _STR,
                            "interval": _STR,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "properties": {
                                        "alert": _STR,
                                        "record": _STR,
                                        "expr": _STR,
                                        "for": _STR,
                                        "labels": {"type": "object", "additionalProperties": _STR},
                                        "annotations": {"type": "object", "additionalProperties": _STR},
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _custom_resource(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {"parameter": _STR, "name": _STR, "key": _STR},
                    },
                },
                "env": {"type": "array"},
                "podIdentity": {"type": "object"},
            },
        },
    ),
}


def documents(path: Path) -> Iterator[dict[str, Any]]:
    """The non-empty YAML documents of a rendered manifest file."""
    with path.open(encoding="utf-8") as stream:
        for doc in yaml.safe_load_all(stream):
            if doc:
                if not isinstance(doc, dict):
                    raise ValueError(f"{path}: a document is not a mapping")
                yield doc


def validate_document(doc: dict[str, Any], versions: list[str]) -> list[str]:
    """Error messages for one resource (empty when it is valid for every version)."""
    kind = str(doc.get("kind", "?"))
    name = str(doc.get("metadata", {}).get("name", "?"))
    label = f"{kind}/{name}"
    crd_schema = CRD_SCHEMAS.get((str(doc.get("apiVersion")), kind))
    if crd_schema is not None:
        validator = jsonschema.Draft7Validator(crd_schema)
        return [f"{label}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    errors: list[str] = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{label} (k8s {version}): {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{label} (k8s {version}): {e.message}")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-k",
        "--kubernetes-version",
        action="append",
        dest="versions",
        help="Kubernetes version to validate against (repeatable; default 1.25 and the latest)",
    )
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    versions: list[str] = args.versions or ["1.25.0", kubernetes_validate.latest_version()]
    failures = 0
    count = 0
    for path in args.files:
        for doc in documents(path):
            count += 1
            for error in validate_document(doc, versions):
                failures += 1
                print(f"ERROR {path}: {error}", file=sys.stderr)
    print(
        f"validated {count} resources from {len(args.files)} file(s) against k8s {', '.join(versions)}: "
        f"{failures} error(s)"
    )
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
