"""The pod no node could take (``wm.engines.argo.unscheduled_pod``), from Argo's node status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from wm.engines.argo import unscheduled_pod

STARTED = "2026-01-02T03:04:05Z"
WAITING = "Unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu."


def workflow(**node: Any) -> dict[str, Any]:
    return {"status": {"nodes": {"wf": {"type": "Pod", "startedAt": STARTED, **node}}}}


def test_a_pending_pod_the_scheduler_cannot_place_is_reported_with_its_reason_and_start() -> None:
    assert unscheduled_pod(workflow(phase="Pending", message=WAITING)) == (
        WAITING,
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


def test_a_failed_pod_that_never_had_a_node_is_reported() -> None:
    found = unscheduled_pod(workflow(phase="Failed", message="Step exceeded its deadline"))
    assert found is not None and found[0] == "Step exceeded its deadline"


def test_pods_that_got_a_node_or_merely_wait_are_not() -> None:
    assert unscheduled_pod(workflow(phase="Failed", message="Error (exit code 1)", hostNodeName="n")) is None
    assert unscheduled_pod(workflow(phase="Pending", message="PodInitializing")) is None
    assert unscheduled_pod(workflow(phase="Running")) is None
    assert unscheduled_pod({"status": {"nodes": {"wf": {"type": "Steps", "phase": "Failed"}}}}) is None
    assert unscheduled_pod({}) is None


def test_a_pod_node_without_a_start_of_its_own_counts_from_the_workflows() -> None:
    found = unscheduled_pod(
        {
            "status": {
                "startedAt": STARTED,
                "nodes": {"wf": {"type": "Pod", "phase": "Pending", "message": WAITING}},
            }
        }
    )
    assert found == (WAITING, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
