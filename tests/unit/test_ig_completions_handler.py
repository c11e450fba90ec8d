"""The IG completion consumer on fakes: statuses mapped per file, foreign tasks ignored, one announcement."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from consumers import ig_completions
from consumers.ig_completions import IgCompletionDeps, handle
from devkit.ig_emulator import VERSIONS, Version
from schemas.events import ExportCompleted, FileExportResult, FileRef, SinkRef
from schemas.monai_ig import ExportCompleteEvent
from tests.unit.fakes import FakeExportTasks
from tests.unit.ig_fakes import ConfirmingPublisher, Delivery, FakeIgExports, golden
from wm.domain.exports import ExportState, ExportTask
from wm.domain.monai_ig import IgExport, ig_keys
from wm.errors import InvalidMessage, TransientError

TASK = "job-1.pacs"
OUTPUT = "jobs/job-1/output"


def completion(status: str | int = "Success", **statuses: str | int) -> ExportCompleteEvent:
    """A completion of ``TASK``; ``statuses`` by file name under the job's output (IG keys derived)."""
    return ExportCompleteEvent.model_validate(
        {
            "workflow_instance_id": "job-1",
            "export_task_id": TASK,
            "status": status,
            "message": "",
            "file_statuses": {f"mwm-exports/{TASK}/mwm/{OUTPUT}/{name}": s for name, s in statuses.items()},
        }
    )


class World:
    """One ig-completions process: export tasks, the hand-offs to the IG, MWM's bus."""

    def __init__(self) -> None:
        self.tasks, self.handoffs, self.bus = FakeExportTasks(), FakeIgExports(), ConfirmingPublisher()
        self.deps = IgCompletionDeps(self.tasks, self.handoffs, self.bus)

    async def handed_off(self, *names: str, skipped: tuple[str, ...] = ()) -> ExportTask:
        """``TASK`` in progress at the IG with the job's outputs ``names`` (``skipped`` by the sink)."""
        now = datetime.now(UTC)
        files = [FileRef(bucket="mwm", key=f"{OUTPUT}/{name}", size=1) for name in (*names, *skipped)]
        task = ExportTask(
            export_task_id=TASK,
            job_id="job-1",
            application_id="mip",
            correlation_id="corr-1",
            sink=SinkRef(name="pacs", type="monai-ig"),
            files=files,
            created_at=now,
            updated_at=now,
        )
        await self.tasks.create(task)
        await self.tasks.claim_task(TASK, "monai-ig", 3600)
        sent = ig_keys(TASK, files[: len(names)], "monaideploy")
        await self.handoffs.begin(
            IgExport(
                export_task_id=TASK,
                job_id="job-1",
                routing_key="md.export.request.monaiscu",
                sent={ig_key: file.key for ig_key, file in sent.items()},
                skipped=[
                    FileExportResult(key=f"{OUTPUT}/{name}", status="skipped", error="not sent")
                    for name in skipped
                ],
                deadline=now + timedelta(hours=1),
                published_at=now,
            )
        )
        return task

    def announced(self) -> list[tuple[ExportCompleted, str | None]]:
        return [(p.event, p.message_id) for p in self.bus.published if isinstance(p.event, ExportCompleted)]

    def results(self) -> dict[str, tuple[str, str]]:
        task = self.tasks.tasks[TASK]
        return {r.key.rsplit("/", 1)[-1]: (r.status, r.error or "") for r in task.file_results}


EXPECTED: dict[Version, tuple[list[str], ExportState, dict[str, tuple[str, str]]]] = {
    "0.3": (["mip.dcm"], ExportState.succeeded, {"mip.dcm": ("succeeded", "")}),
    "0.4": (
        ["a.dcm", "b.dcm"],
        ExportState.partial,
        {"a.dcm": ("succeeded", ""), "b.dcm": ("failed", "IG file status ServiceError (PartialFailure)")},
    ),
    "0.5": (
        ["mip.dcm"],
        ExportState.failed,
        {"mip.dcm": ("failed", "IG file status ConfigurationError (Failure)")},
    ),
}


@pytest.mark.parametrize("version", VERSIONS)
async def test_each_versions_completion_makes_the_task_final_per_file_and_announces_it(
    version: Version,
) -> None:
    world = World()
    names, state, results = EXPECTED[version]
    await world.handed_off(*names)

    await handle(ExportCompleteEvent.model_validate(golden("export_complete", version)), world.deps)

    task = world.tasks.tasks[TASK]
    assert task.state is state and task.completion_published
    assert {
        name: (status, error.split(":")[0]) for name, (status, error) in world.results().items()
    } == results
    [(event, message_id)] = world.announced()
    assert message_id == f"{TASK}.completed" and event.file_results == task.file_results
    assert world.handoffs.exports[TASK].resolved


async def test_partial_failure_records_each_files_status_given_as_integer_or_name() -> None:
    world = World()
    await world.handed_off("a.dcm", "b.dcm", "c.dcm", skipped=("report.txt",))

    statuses: dict[str, str | int] = {"a.dcm": 0, "b.dcm": "UnsupportedDataType"}
    await handle(completion(2, **statuses), world.deps)

    task = world.tasks.tasks[TASK]
    assert task.state is ExportState.partial
    assert world.results() == {
        "a.dcm": ("succeeded", ""),
        "b.dcm": ("failed", "IG file status UnsupportedDataType (PartialFailure)"),
        "c.dcm": ("failed", "no file status from the IG (PartialFailure)"),
        "report.txt": ("skipped", "not sent"),
    }
    [(event, _)] = world.announced()
    assert event.status == "partial"


async def test_a_success_without_file_statuses_as_from_ig_030_succeeds_every_file_sent() -> None:
    world = World()
    await world.handed_off("a.dcm", "b.dcm")

    await handle(completion("Success"), world.deps)

    assert world.tasks.tasks[TASK].state is ExportState.succeeded
    assert set(world.results().values()) == {("succeeded", "")}


@pytest.mark.parametrize(
    ("task_id", "workflow_instance_id"),
    [("a-wm-task", "wm-instance-1"), (TASK, "wm-instance-1")],
    ids=["unknown task", "known task id of another workflow instance"],
)
async def test_a_completion_for_a_task_mwm_did_not_hand_off_is_acknowledged_and_ignored(
    task_id: str, workflow_instance_id: str
) -> None:
    world = World()
    await world.handed_off("a.dcm")
    foreign = completion("Failure", **{"a.dcm": 1}).model_copy(
        update={"export_task_id": task_id, "workflow_instance_id": workflow_instance_id}
    )

    await handle(foreign, world.deps)  # returns: the delivery is acknowledged, not dead-lettered

    assert world.bus.published == [] and world.handoffs.claims == {}
    assert not world.tasks.tasks[TASK].is_final and not world.handoffs.exports[TASK].resolved


async def test_a_duplicate_completion_changes_nothing_and_announces_nothing_more() -> None:
    world = World()
    await world.handed_off("a.dcm")
    await handle(completion("Success", **{"a.dcm": 0}), world.deps)

    await handle(completion("Failure", **{"a.dcm": 3}), world.deps)  # a late, different one too

    assert world.tasks.tasks[TASK].state is ExportState.succeeded
    assert world.results() == {"a.dcm": ("succeeded", "")}
    assert len(world.announced()) == 1


async def test_two_duplicate_completions_handled_at_once_publish_the_completion_once() -> None:
    world = World()
    await world.handed_off("a.dcm", "b.dcm")
    duplicate = completion("Success", **{"a.dcm": 0, "b.dcm": 0})

    await asyncio.gather(handle(duplicate, world.deps), handle(duplicate, world.deps))

    [(event, message_id)] = world.announced()
    assert event.status == "succeeded" and message_id == f"{TASK}.completed"
    assert world.tasks.tasks[TASK].completion_published and world.handoffs.exports[TASK].resolved


async def test_a_publish_that_fails_is_claimed_again_by_the_retry_and_published_once() -> None:
    world = World()
    await world.handed_off("a.dcm")
    world.bus.fail_next()  # MWM's broker goes down between the final write and the publish
    with pytest.raises(TransientError):
        await handle(completion("Success"), world.deps)
    assert world.announced() == [] and world.handoffs.claims == {}, "the claim was given back"

    await handle(completion("Success"), world.deps)  # the runtime's retry of the same delivery
    await handle(completion("Success"), world.deps)  # and a redelivery after the ack was lost

    [(_, message_id)] = world.announced()
    assert message_id == f"{TASK}.completed" and world.tasks.tasks[TASK].completion_published


async def test_a_database_outage_propagates_for_a_retry() -> None:
    world = World()
    await world.handed_off("a.dcm")
    world.handoffs.fail_next()

    with pytest.raises(TransientError):
        await handle(completion("Success"), world.deps)

    assert not world.tasks.tasks[TASK].is_final and world.announced() == []


SUCCESS = golden("export_complete", "0.3")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"message_id": None}, "missing AMQP property message_id"),
        ({"body": b'{"export_task_id": "t", "status": "Success"'}, "ExportCompleteEvent failed validation"),
        ({"body": b'{"workflow_instance_id": "j", "export_task_id": "t"}'}, "status: Field required"),
        (
            {"body": json.dumps(golden("export_complete", "0.4") | {"status": "Done"}).encode()},
            "'Done' is not one of",
        ),
    ],
)
def test_a_malformed_completion_is_dead_lettered_with_its_reason(
    changes: dict[str, Any], reason: str
) -> None:
    source = ig_completions.CONSUMER.source
    assert source is not None
    delivery = Delivery(json.dumps(SUCCESS).encode())
    for key, value in changes.items():
        setattr(delivery, key, value)

    with pytest.raises(InvalidMessage, match=reason):  # the runtime dead-letters it with this reason
        source.decode(cast(AbstractIncomingMessage, delivery))
