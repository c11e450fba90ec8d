"""A stand-in for the Argo Server: its REST paths and JSON shapes, with phases the test controls.

Argo cannot run here (it needs a Kubernetes API server and kubelets), so the ``argo`` engine is tested
through the real SDK against this HTTP server. It implements what the engine calls: create, get, list
(label selector), stop, terminate, delete and lint of workflows, and get of a workflow template. Its
answers keep Argo's quirks: ``null`` fields in the status, gRPC-style errors ``{"code", "message"}``
(404 code 5, 409 code 6, 400 code 3, 401 code 16) and the 500 code 13 ``cannot shutdown a completed
workflow`` that stop/terminate answer for a finished workflow.

The test drives it: ``set_phase`` / ``script`` move a workflow through Pending, Running, Succeeded,
Failed or Error; ``fail_next`` answers the next requests with an error status; ``stop`` / ``start``
make the port unreachable and back; ``calls`` records every ``(method, path)``.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Json = dict[str, Any]
Reply = tuple[int, Json]
TERMINAL = ("Succeeded", "Failed", "Error")
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13, 502: 14, 503: 14, 504: 4}


class ArgoFailure(Exception):
    """Raised by a route: answered as Argo's error JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Scripted:
    """Phases a workflow takes at given offsets (seconds) from when the script was set."""

    started: float
    steps: list[tuple[float, str, str | None]] = field(default_factory=list)


class ArgoServer:
    """The fake Argo Server; a context manager that serves on a free port of 127.0.0.1."""

    def __init__(self, token: str = "", tls: tuple[str, str] | None = None) -> None:
        """``token``: the bearer token required (empty: none); ``tls``: (certificate, key) PEM files."""
        self.token = token
        self.tls = tls
        self.calls: list[tuple[str, str]] = []
        self.workflows: dict[tuple[str, str], Json] = {}
        self.templates: dict[tuple[str, str], Json] = {}
        self._scripts: dict[tuple[str, str], _Scripted] = {}
        self._failures: list[int] = []
        self._lock = threading.RLock()
        self._port = 0
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL (plain HTTP unless ``tls`` was given)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port}"

    def start(self) -> None:
        """Serve (again, on the same port once one was chosen)."""
        self._http = ThreadingHTTPServer(("127.0.0.1", self._port), _handler_for(self))
        self._http.daemon_threads = True
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
        self._port = self._http.server_address[1]
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.02,), name="fake-argo", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving: connections to the port are refused until ``start``."""
        if self._http is not None and self._thread is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join(timeout=5)
        self._http = self._thread = None

    def __enter__(self) -> ArgoServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- test controls ---------------------------------------------------------------------------

    def add_template(self, name: str, namespace: str = "argo") -> None:
        """Register a WorkflowTemplate with one container template."""
        spec = {"entrypoint": "main", "templates": [{"name": "main", "container": {"image": "busybox"}}]}
        with self._lock:
            self.templates[(namespace, name)] = {"metadata": _metadata(name, namespace, {}), "spec": spec}

    def set_phase(self, name: str, phase: str, message: str | None = None, namespace: str = "argo") -> None:
        """Move a workflow to ``phase`` (as the controller would), with an optional status message."""
        with self._lock:
            _advance(self._workflow(namespace, name), phase, message)

    def script(self, name: str, steps: list[tuple[float, str, str | None]], namespace: str = "argo") -> None:
        """Phases over time: ``[(after_s, phase, message), ...]``, applied when the workflow is read."""
        with self._lock:
            self._workflow(namespace, name)
            self._scripts[(namespace, name)] = _Scripted(time.monotonic(), sorted(steps))

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` requests with ``status`` (Argo's error JSON)."""
        with self._lock:
            self._failures.extend([status] * count)

    def workflow(self, name: str, namespace: str = "argo") -> Json | None:
        """The stored workflow (scripted phases applied), or None."""
        with self._lock:
            self._run_script(namespace, name)
            return self.workflows.get((namespace, name))

    def called(self, method: str, suffix: str) -> int:
        """How many calls used ``method`` on a path ending in ``suffix``."""
        return sum(1 for m, path in self.calls if m == method and path.endswith(suffix))

    # -- request handling ------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], body: Json) -> Reply:
        """Answer one request (called from the HTTP handler thread)."""
        parts = urlsplit(target)
        with self._lock:
            self.calls.append((method, parts.path))
            try:
                self._admit(headers)
                return self._route(method, parts.path, parse_qs(parts.query), body)
            except ArgoFailure as failure:
                return failure.status, {"code": GRPC_CODES.get(failure.status, 2), "message": str(failure)}

    def _admit(self, headers: dict[str, str]) -> None:
        if self._failures:
            status = self._failures.pop(0)
            raise ArgoFailure(status, f"injected failure {status}")
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            raise ArgoFailure(
                401, "token not valid. see https://argo-workflows.readthedocs.io/en/latest/faq/"
            )

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Json) -> Reply:
        for route_method, pattern, action in _ROUTES:
            match = pattern.fullmatch(path)
            if match and route_method == method:
                return action(self, *match.groups(), query=query, body=body)
        raise ArgoFailure(404, f"Not Found: {method} {path}")

    def _workflow(self, namespace: str, name: str) -> Json:
        self._run_script(namespace, name)
        workflow = self.workflows.get((namespace, name))
        if workflow is None:
            raise ArgoFailure(404, f'workflows.argoproj.io "{name}" not found')
        return workflow

    def _run_script(self, namespace: str, name: str) -> None:
        scripted = self._scripts.get((namespace, name))
        workflow = self.workflows.get((namespace, name))
        if scripted is None or workflow is None:
            return
        elapsed = time.monotonic() - scripted.started
        while scripted.steps and scripted.steps[0][0] <= elapsed:
            _, phase, message = scripted.steps.pop(0)
            _advance(workflow, phase, message)

    # -- routes ----------------------------------------------------------------------------------

    def _create_workflow(self, namespace: str, *, body: Json, **_: Any) -> Reply:
        manifest = body.get("workflow") or {}
        meta = manifest.get("metadata") or {}
        name = meta.get("name") or f"{meta.get('generateName', 'wf-')}{uuid.uuid4().hex[:5]}"
        if (namespace, name) in self.workflows:
            raise ArgoFailure(409, f'workflows.argoproj.io "{name}" already exists')
        workflow = {
            "metadata": {
                **_metadata(name, namespace, meta.get("labels") or {}),
                "generateName": meta.get("generateName"),
            },
            "spec": manifest.get("spec") or {},
            "status": {
                "phase": "",
                "startedAt": None,
                "finishedAt": None,
                "nodes": None,
                "message": None,
                "progress": None,
                "conditions": None,
            },
        }
        self.workflows[(namespace, name)] = workflow
        return 200, workflow

    def _get_workflow(self, namespace: str, name: str, **_: Any) -> Reply:
        return 200, self._workflow(namespace, name)

    def _list_workflows(self, namespace: str, *, query: dict[str, list[str]], **_: Any) -> Reply:
        wanted = _selector(query.get("listOptions.labelSelector", [""])[0])
        items = [
            self._workflow(ns, name)
            for (ns, name), wf in list(self.workflows.items())
            if ns == namespace and wanted.items() <= (wf["metadata"]["labels"] or {}).items()
        ]
        return 200, {"metadata": {"resourceVersion": str(len(self.calls))}, "items": items or None}

    def _stop_workflow(self, namespace: str, name: str, **_: Any) -> Reply:
        workflow = self._running(namespace, name)
        workflow["spec"]["shutdown"] = "Stop"
        return 200, workflow

    def _terminate_workflow(self, namespace: str, name: str, **_: Any) -> Reply:
        workflow = self._running(namespace, name)
        workflow["spec"]["shutdown"] = "Terminate"
        _advance(workflow, "Failed", "Stopped with strategy 'Terminate'")
        return 200, workflow

    def _delete_workflow(self, namespace: str, name: str, **_: Any) -> Reply:
        self._workflow(namespace, name)
        del self.workflows[(namespace, name)]
        return 200, {}

    def _lint_workflow(self, namespace: str, *, body: Json, **_: Any) -> Reply:
        manifest = body.get("workflow") or {}
        problem = _lint(manifest.get("spec") or {})
        if problem:
            raise ArgoFailure(400, problem)
        return 200, {
            "metadata": _metadata(manifest.get("metadata", {}).get("name", ""), namespace, {}),
            "spec": manifest.get("spec"),
            "status": {},
        }

    def _get_workflow_template(self, namespace: str, name: str, **_: Any) -> Reply:
        template = self.templates.get((namespace, name))
        if template is None:
            raise ArgoFailure(404, f'workflowtemplates.argoproj.io "{name}" not found')
        return 200, template

    def _running(self, namespace: str, name: str) -> Json:
        workflow = self._workflow(namespace, name)
        if workflow["status"]["phase"] in TERMINAL:
            raise ArgoFailure(
                500,
                f"cannot shutdown a completed workflow: workflow: {name!r}, namespace: {namespace!r}".replace(
                    "'", '"'
                ),
            )
        return workflow


Route = Callable[..., Reply]
_WF = r"/api/v1/workflows/([a-z0-9-]+)"
_TEMPLATE = r"/api/v1/workflow-templates/([a-z0-9-]+)/([a-z0-9.-]+)"
_ROUTES: list[tuple[str, re.Pattern[str], Route]] = [
    ("POST", re.compile(f"{_WF}/lint"), ArgoServer._lint_workflow),
    ("POST", re.compile(_WF), ArgoServer._create_workflow),
    ("GET", re.compile(_WF), ArgoServer._list_workflows),
    ("GET", re.compile(rf"{_WF}/([a-z0-9.-]+)"), ArgoServer._get_workflow),
    ("DELETE", re.compile(rf"{_WF}/([a-z0-9.-]+)"), ArgoServer._delete_workflow),
    ("PUT", re.compile(rf"{_WF}/([a-z0-9.-]+)/stop"), ArgoServer._stop_workflow),
    ("PUT", re.compile(rf"{_WF}/([a-z0-9.-]+)/terminate"), ArgoServer._terminate_workflow),
    ("GET", re.compile(_TEMPLATE), ArgoServer._get_workflow_template),
]


def _metadata(name: str, namespace: str, labels: dict[str, str]) -> Json:
    return {
        "name": name,
        "namespace": namespace,
        "uid": str(uuid.uuid4()),
        "resourceVersion": "1",
        "generation": 1,
        "creationTimestamp": _timestamp(),
        "labels": labels or None,
        "annotations": None,
        "managedFields": None,
    }


def _selector(text: str) -> dict[str, str]:
    pairs = [term.split("=", 1) for term in text.split(",") if "=" in term]
    return {key.strip(): value.strip() for key, value in pairs}


def _lint(spec: Json) -> str:
    if spec.get("workflowTemplateRef"):
        return ""
    names = {template.get("name") for template in spec.get("templates") or []}
    if not names:
        return "spec.templates is required"
    if spec.get("entrypoint") not in names:
        return f"spec.entrypoint template '{spec.get('entrypoint')}' not found"
    for template in spec.get("templates") or []:
        if "container" in template and not (template["container"] or {}).get("image"):
            return f"templates.{template.get('name')}.container.image may not be empty"
    return ""


def _output_artifacts(name: str, spec: Json) -> list[Json]:
    """What the pod node reports as outputs: the declared S3 artifacts and the archived log."""
    declared = [
        artifact
        for template in spec.get("templates") or []
        for artifact in (template.get("outputs") or {}).get("artifacts") or []
    ]
    declared += [
        artifact
        for artifact in (spec.get("arguments") or {}).get("artifacts") or []
        if artifact.get("name") == "output"
    ]
    logs = {"name": "main-logs", "s3": {"key": f"logs/{name}/main.log", "bucket": None}}
    return [
        {"name": artifact["name"], "s3": {"key": s3["key"], "bucket": s3.get("bucket")}}
        for artifact in declared
        if (s3 := artifact.get("s3"))
    ] + [logs]


def _advance(workflow: Json, phase: str, message: str | None) -> None:
    """The controller's part: the workflow's status, and one pod node, in ``phase``."""
    status, name = workflow["status"], workflow["metadata"]["name"]
    status.update(phase=phase, message=message)
    if phase != "Pending":
        status["startedAt"] = status["startedAt"] or _timestamp()
    done = phase in TERMINAL
    status["finishedAt"] = _timestamp() if done else None
    succeeded = phase == "Succeeded"
    outputs = {"artifacts": _output_artifacts(name, workflow["spec"]), "exitCode": "0"} if succeeded else None
    status["nodes"] = {
        name: {
            "id": name,
            "name": name,
            "displayName": name,
            "type": "Pod",
            "templateName": workflow["spec"].get("entrypoint"),
            "phase": phase,
            "message": message,
            "startedAt": status["startedAt"],
            "finishedAt": status["finishedAt"],
            "outputs": outputs,
        }
    }
    status["progress"] = "1/1" if done else "0/1"


def _handler_for(server: ArgoServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """HTTP/1.0, one request per connection: after ``stop`` nothing answers on a kept-alive socket."""

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else {}
            headers = {key.lower(): value for key, value in self.headers.items()}
            status, payload = server.handle(self.command, self.path, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test asserts on ``calls`` instead."""

    return Handler
