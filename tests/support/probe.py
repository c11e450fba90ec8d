"""A consumer for bus-runtime tests: every attempt is logged; the effect is one insert under a unique key.

``MWM_PROBE_SLEEP_S`` makes each attempt sleep before its effect (to kill or stop a process mid-handler).
An event whose ``payload_id`` starts with ``reject-`` fails permanently.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.events import PayloadArrived
from wm.adapters.mongo import Database, translated_errors
from wm.errors import PermanentError
from wm.runtime import Consumer, Services

ATTEMPTS = "probe_attempts"
EFFECTS = "probe_effects"


@dataclass(frozen=True)
class ProbeDeps:
    database: Database
    sleep_s: float


async def handle(event: PayloadArrived, deps: ProbeDeps) -> None:
    if event.payload_id.startswith("reject-"):
        raise PermanentError(f"payload {event.payload_id} is refused by the probe")
    async with translated_errors("probe attempt"):
        await deps.database.collection(ATTEMPTS).insert_one(
            {"payload_id": event.payload_id, "pid": os.getpid(), "at": datetime.now(UTC)}
        )
    if deps.sleep_s:
        await asyncio.sleep(deps.sleep_s)
    async with translated_errors("probe effect"):
        await deps.database.collection(EFFECTS).insert_one({"_id": event.payload_id, "pid": os.getpid()})


def build(services: Services) -> ProbeDeps:
    return ProbeDeps(services.database, float(os.environ.get("MWM_PROBE_SLEEP_S", "0")))


CONSUMER = Consumer[ProbeDeps](
    name="probe",
    routing_keys=(PayloadArrived.event_type,),
    handlers={PayloadArrived: handle},
    build_deps=build,
)
