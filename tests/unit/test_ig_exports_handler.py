"""The IG export consumer on fakes: one hand-off per task id, the deadline, one announcement per task."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from consumers import ig_completions
from consumers.ig_exports import IgExportDeps, fail_overdue, give_up, handle
from schemas.applications import SinkDefinition
from schemas.events import ExportCompleted, ExportRequested, SinkRef
from schemas.monai_ig import ExportCompleteEvent, ExportRequestEvent
from tests.unit.fakes import FakeExportTasks, FakeSinks
from tests.unit.ig_fakes import ConfirmingPublisher, FakeIgExports, FakeIgPublisher, FakeObjectStore
from wm.config import IgSettings, Settings
from wm.domain.exports import ExportState, task_for
from wm.errors import Duplicate, TransientError
from wm.stores.ig_exports import announce_stale

TASK = "job-1.ig-pacs"
DEADLINE_S = 600.0


def ig_sink(name: str = "ig-pacs") -> SinkDefinition:
    return SinkDefinition.model_validate(
        {"name": name, "type": "monai-ig", "args": {"destinations": ["PACS"], "plug_in_assemblies": ["P, A"]}}
    )


class World:
    """One MWM process with the ig-exports and ig-completions consumers, on fakes."""

    def __init__(self, *names: str, sink: str = "ig-pacs") -> None:
        settings = Settings()
        self.settings = settings.model_copy(
            update={"ig": IgSettings(enabled=True, export_deadline_s=DEADLINE_S, sweep_interval_s=1)}
        )
        self.tasks, self.handoffs, self.bus = FakeExportTasks(), FakeIgExports(), ConfirmingPublisher()
        self.objects, self.ig = FakeObjectStore("mwm"), FakeIgPublisher()
        self.deps = IgExportDeps(
            self.tasks, self.handoffs, FakeSinks(ig_sink()), self.objects, self.ig, self.bus, self.settings
        )
        files = [self.objects.put(f"jobs/job-1/output/{name}", name.encode()) for name in names]
        self.event = ExportRequested(
            correlation_id="corr-1",
            export_task_id=TASK,
            job_id="job-1",
            application_id="mip",
            sink=SinkRef(name=sink, type="monai-ig"),
            files=files,
        )

    def requests(self) -> list[ExportRequestEvent]:
        return [send.body for send in self.ig.sent if isinstance(send.body, ExportRequestEvent)]

    def announced(self) -> list[ExportCompleted]:
        return [p.event for p in self.bus.published if isinstance(p.event, ExportCompleted)]

    async def complete(self, status: str) -> None:
        """The IG's completion of the task, handled by ig-completions."""
        [request] = self.requests()
        event = ExportCompleteEvent.model_validate(
            {
                "workflow_instance_id": request.workflow_instance_id,
                "export_task_id": request.export_task_id,
                "status": status,
                "file_statuses": dict.fromkeys(request.files, 0 if status == "Success" else 3),
            }
        )
        await ig_completions.handle(
            event, ig_completions.IgCompletionDeps(self.tasks, self.handoffs, self.bus)
        )


async def test_a_task_is_handed_to_the_ig_once_its_files_are_in_the_igs_bucket() -> None:
    world = World("a.dcm", "b.dcm", "report.txt")

    await handle(world.event, world.deps)

    [send] = world.ig.sent
    request = send.body
    assert isinstance(request, ExportRequestEvent)
    assert send.routing_key == "md.export.request.monaiscu" and send.correlation_id == "corr-1"
    assert request.workflow_instance_id == "job-1" and request.export_task_id == TASK
    assert request.files == [f"mwm-exports/{TASK}/mwm/jobs/job-1/output/{n}" for n in ("a.dcm", "b.dcm")]
    assert request.destinations == ["PACS"] and request.plug_in_assemblies == ["P, A"]
    assert sorted(world.objects.objects["monaideploy"]) == request.files, "copied before the publish"
    record = world.handoffs.exports[TASK]
    assert record.published_at is not None and not record.resolved
    assert [r.key for r in record.skipped] == ["jobs/job-1/output/report.txt"]
    task = world.tasks.tasks[TASK]
    assert task.state is ExportState.in_progress and task.lease_owner == "monai-ig"
    assert world.bus.published == [], "nothing on MWM's bus until the completion or the deadline"


async def test_a_redelivered_request_is_a_duplicate_and_the_task_id_is_published_once() -> None:
    world = World("a.dcm")
    await handle(world.event, world.deps)

    with pytest.raises(Duplicate):
        await handle(world.event, world.deps)

    assert len(world.requests()) == 1


async def test_two_deliveries_of_a_request_at_once_publish_the_task_id_once() -> None:
    world = World("a.dcm")

    outcomes = await asyncio.gather(
        handle(world.event, world.deps), handle(world.event, world.deps), return_exceptions=True
    )

    assert len(world.requests()) == 1
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["Duplicate", "NoneType"]


async def test_a_publish_the_igs_broker_does_not_confirm_is_abandoned_and_the_retry_publishes_once() -> None:
    world = World("a.dcm")
    world.ig.fail_next()
    with pytest.raises(TransientError):
        await handle(world.event, world.deps)
    assert world.handoffs.exports == {}, "the hand-off was given back"

    await handle(world.event, world.deps)

    assert len(world.requests()) == 1 and world.handoffs.exports[TASK].published_at is not None


async def test_an_unknown_sink_fails_the_task_at_once_and_sends_nothing() -> None:
    world = World("a.dcm", sink="gone")

    await handle(world.event, world.deps)

    [completed] = world.announced()
    assert completed.status == "failed" and "sink gone does not exist" in completed.message
    assert world.ig.sent == [] and world.tasks.tasks[TASK].state is ExportState.failed


async def test_a_task_whose_files_the_sink_all_skips_ends_without_the_ig() -> None:
    world = World("report.txt")

    await handle(world.event, world.deps)

    [completed] = world.announced()
    assert completed.status == "succeeded" and [r.status for r in completed.file_results] == ["skipped"]
    assert world.ig.sent == [] and world.handoffs.exports == {}


async def test_a_final_task_redelivered_is_announced_once() -> None:
    world = World("a.dcm")
    await handle(world.event, world.deps)
    await world.complete("Success")

    await handle(world.event, world.deps)

    assert len(world.requests()) == 1 and len(world.announced()) == 1


async def test_a_completion_that_never_comes_fails_the_task_at_its_deadline() -> None:
    world = World("a.dcm", "report.txt")
    await handle(world.event, world.deps)
    deadline = world.handoffs.exports[TASK].deadline
    assert await fail_overdue(world.deps, deadline - timedelta(seconds=1)) == 0

    assert await fail_overdue(world.deps, deadline + timedelta(seconds=1)) == 1
    assert await fail_overdue(world.deps, deadline + timedelta(seconds=2)) == 0

    [completed] = world.announced()
    assert completed.status == "failed"
    assert completed.message.startswith("no md.export.complete from the IG by the deadline")
    assert "md.export.request.monaiscu published" in completed.message
    statuses = {r.key.rsplit("/", 1)[-1]: r.status for r in completed.file_results}
    assert statuses == {"a.dcm": "failed", "report.txt": "skipped"}
    assert world.handoffs.exports[TASK].resolved and world.tasks.tasks[TASK].state is ExportState.failed


async def test_a_completion_after_the_deadline_changes_nothing() -> None:
    world = World("a.dcm")
    await handle(world.event, world.deps)
    await fail_overdue(world.deps, datetime.now(UTC) + timedelta(seconds=2 * DEADLINE_S))

    await world.complete("Success")

    assert world.tasks.tasks[TASK].state is ExportState.failed and len(world.announced()) == 1


async def test_a_completion_and_the_deadline_at_once_announce_the_task_once() -> None:
    world = World("a.dcm")
    await handle(world.event, world.deps)

    await asyncio.gather(
        world.complete("Success"),
        fail_overdue(world.deps, datetime.now(UTC) + timedelta(seconds=2 * DEADLINE_S)),
    )

    [completed] = world.announced()
    assert completed.status == world.tasks.tasks[TASK].state.value, "the one result recorded"


async def test_an_announcement_whose_claimer_died_is_published_by_the_sweep_once() -> None:
    world = World("a.dcm")
    await handle(world.event, world.deps)
    await world.tasks.record_result(TASK, "succeeded", [], "sent")
    # The claimer won the claim and died before publishing.
    assert await world.handoffs.claim_announcement(f"{TASK}.completed", TASK)
    lease = timedelta(seconds=30)

    assert await announce_stale(world.tasks, world.handoffs, world.bus, lease) == 0
    world.handoffs.claims[f"{TASK}.completed"].claimed_at -= 2 * lease
    assert await announce_stale(world.tasks, world.handoffs, world.bus, lease) == 1
    assert await announce_stale(world.tasks, world.handoffs, world.bus, timedelta(0)) == 0

    [completed] = world.announced()
    assert completed.status == "succeeded" and world.tasks.tasks[TASK].completion_published
    await world.complete("Success")  # the IG's re-sent completion finds it announced
    assert len(world.announced()) == 1


async def test_a_stale_claim_of_a_task_purged_since_holds_up_no_other() -> None:
    world = World("a.dcm")
    for task_id in ("purged.ig-pacs", TASK):
        assert await world.handoffs.claim_announcement(f"{task_id}.completed", task_id)
    await world.tasks.create(task_for(world.event, datetime.now(UTC)))
    await world.tasks.record_result(TASK, "failed", [], "refused")

    assert await announce_stale(world.tasks, world.handoffs, world.bus, timedelta(0)) == 1

    assert [c.export_task_id for c in world.announced()] == [TASK]
    assert await world.handoffs.stale_announcements(timedelta(0)) == []


async def test_retries_exhausted_fail_the_task_with_the_reason() -> None:
    world = World("a.dcm")
    world.ig.fail_next()  # the IG's broker is down through every attempt
    with pytest.raises(TransientError):
        await handle(world.event, world.deps)

    await give_up(world.event, world.deps, "transient failure persisted after 5 attempts: IG down")

    [completed] = world.announced()
    assert completed.status == "failed" and "IG down" in completed.message
    assert [r.status for r in completed.file_results] == ["failed"] and world.ig.sent == []
