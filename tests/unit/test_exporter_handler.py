"""The exporter on fakes: one run per task, the outcome recorded once, redelivery, leases, failures."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from consumers.exporter import ExporterDeps, give_up, handle, sweep_expired_leases
from schemas.applications import SinkDefinition
from schemas.events import ExportCompleted, ExportRequested
from tests.unit.builders import export_requested, sink
from tests.unit.fakes import FakeExportRetries, FakeExportTasks, FakePublisher, FakeSink, FakeSinks
from wm.domain.exports import ExportState, RedeliveryPolicy, task_for
from wm.errors import Duplicate, TransientError
from wm.sinks import UnknownSinkType

FILES = ["jobs/job-1/output/a.dcm", "jobs/job-1/output/b.dcm"]


class World:
    """The exporter's fakes: the sink ``pacs`` and the tasks, as one exporter process sees them."""

    def __init__(self, failing: tuple[str, ...] = ()) -> None:
        self.tasks, self.publisher = FakeExportTasks(), FakePublisher()
        self.sink = FakeSink(sink("pacs"), failing)
        self.retries = FakeExportRetries(self.tasks)
        self.deps = ExporterDeps(
            self.tasks,
            FakeSinks(sink("pacs")),
            self.open_sink,
            self.publisher,
            "test",
            60,
            self.retries,
            RedeliveryPolicy(window_s=3600, initial_s=1, max_s=60),
            sweep_interval_s=0.01,
            redelivery_sweep_s=0.01,
        )

    def open_sink(self, definition: SinkDefinition) -> FakeSink:
        if definition.name != self.sink.definition.name:
            raise UnknownSinkType(f"no sink for {definition.name}")
        return self.sink

    def completed(self) -> list[tuple[ExportCompleted, str | None]]:
        return [
            (p.event, p.message_id) for p in self.publisher.published if isinstance(p.event, ExportCompleted)
        ]


async def test_a_request_runs_the_sink_once_records_the_outcome_and_announces_it() -> None:
    world = World(failing=(FILES[1],))

    await handle(export_requested(FILES), world.deps)

    assert world.sink.sent == [FILES]
    task = world.tasks.tasks["job-1.pacs"]
    assert task.state is ExportState.partial and task.completion_published
    assert [r.status for r in task.file_results] == ["succeeded", "failed"]
    [(event, message_id)] = world.completed()
    assert event.status == "partial" and message_id == "job-1.pacs.completed"
    assert event.file_results == task.file_results


async def test_a_redelivered_request_of_a_final_task_sends_and_publishes_nothing() -> None:
    world = World()
    event = export_requested(FILES)
    await handle(event, world.deps)

    await handle(event, world.deps)

    assert len(world.sink.sent) == 1 and len(world.completed()) == 1


async def test_a_completion_recorded_but_never_confirmed_is_republished_under_the_same_id() -> None:
    world = World()
    event = export_requested(FILES)
    world.publisher.fail_next()  # the broker goes down between the final write and the publish
    with pytest.raises(TransientError):
        await handle(event, world.deps)
    assert world.completed() == [] and world.tasks.tasks["job-1.pacs"].state is ExportState.succeeded

    await handle(event, world.deps)

    assert len(world.sink.sent) == 1
    assert [message_id for _, message_id in world.completed()] == ["job-1.pacs.completed"]
    assert world.tasks.tasks["job-1.pacs"].completion_published


async def test_a_task_another_exporter_holds_is_a_duplicate() -> None:
    world = World()
    event = export_requested(FILES)
    await world.tasks.create(task_for(event, datetime.now(UTC)))
    await world.tasks.claim_task(event.export_task_id, "other-exporter", 60)

    with pytest.raises(Duplicate):
        await handle(event, world.deps)

    assert world.sink.sent == [] and world.publisher.published == []


async def test_an_unknown_sink_fails_every_file_with_the_reason() -> None:
    world = World()

    await handle(export_requested(FILES, sink_name="gone", task_id="job-1.gone"), world.deps)

    task = world.tasks.tasks["job-1.gone"]
    assert task.state is ExportState.failed and "gone" in task.message
    assert {r.status for r in task.file_results} == {"failed"}
    assert [event.status for event, _ in world.completed()] == ["failed"]


async def test_an_outage_inside_the_sink_gives_the_task_back_for_the_retry() -> None:
    world = World()
    world.sink.error = TransientError("object store down")
    event = export_requested(FILES)

    with pytest.raises(TransientError):
        await handle(event, world.deps)
    task = world.tasks.tasks["job-1.pacs"]
    assert task.state is ExportState.pending and task.lease_owner is None
    world.sink.error = None
    await handle(event, world.deps)

    assert [event.status for event, _ in world.completed()] == ["succeeded"]


async def test_giving_up_fails_the_task_and_announces_it_but_keeps_a_final_result() -> None:
    world = World()
    event = export_requested(FILES)

    await give_up(event, world.deps, "database down")
    await give_up(event, world.deps, "again")

    task = world.tasks.tasks["job-1.pacs"]
    assert task.state is ExportState.failed and task.message == "database down"
    assert [r.error for r in task.file_results] == ["database down"] * 2
    assert len(world.completed()) == 1


async def test_the_sweep_re_requests_a_task_whose_holder_died() -> None:
    world = World()
    event = export_requested(FILES)
    await world.tasks.create(task_for(event, datetime.now(UTC)))
    await world.tasks.claim_task(event.export_task_id, "dead-exporter", 60)
    world.tasks.change(event.export_task_id, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
    stop = asyncio.Event()
    sweeper = asyncio.create_task(sweep_expired_leases(world.deps, stop))

    async with asyncio.timeout(10):
        await world.publisher.changed.wait()
    stop.set()
    await sweeper

    [published] = world.publisher.published
    assert isinstance(published.event, ExportRequested) and published.event.files == event.files
    assert published.message_id == "job-1.pacs.requested.lease1"
    assert world.tasks.tasks["job-1.pacs"].state is ExportState.pending
