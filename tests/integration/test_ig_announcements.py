"""Claims on announcing an IG task's end, on the real MongoDB-wire server (``wm.stores.ig_exports``)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from wm.adapters.mongo import Database
from wm.config import Settings
from wm.stores.ig_exports import IG_EXPORT_ANNOUNCEMENTS, INDEXES, IgExports

MESSAGE_ID = "job-1.ig-pacs.completed"


async def test_of_claims_made_at_once_exactly_one_wins(live_settings: Settings) -> None:
    async with Database(live_settings.mongo, INDEXES) as database:
        handoffs = IgExports(database)

        won = await asyncio.gather(
            *(handoffs.claim_announcement(MESSAGE_ID, "job-1.ig-pacs") for _ in range(8))
        )

        assert sorted(won) == [False] * 7 + [True]


async def test_a_released_claim_can_be_won_again_and_an_announced_one_cannot(live_settings: Settings) -> None:
    async with Database(live_settings.mongo, INDEXES) as database:
        handoffs = IgExports(database)
        assert await handoffs.claim_announcement(MESSAGE_ID, "job-1.ig-pacs")
        await handoffs.release_announcement(MESSAGE_ID)  # its publish failed

        assert await handoffs.claim_announcement(MESSAGE_ID, "job-1.ig-pacs")
        await handoffs.mark_announced(MESSAGE_ID)
        await handoffs.release_announcement(MESSAGE_ID)  # too late: it was published

        assert not await handoffs.claim_announcement(MESSAGE_ID, "job-1.ig-pacs")
        assert await handoffs.stale_announcements(timedelta(0)) == []


async def test_an_unconfirmed_claim_turns_stale_and_one_sweeper_takes_it_over(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, INDEXES) as database:
        handoffs = IgExports(database)
        assert await handoffs.claim_announcement(MESSAGE_ID, "job-1.ig-pacs")
        lease = timedelta(seconds=30)
        assert await handoffs.stale_announcements(lease) == []
        assert not await handoffs.reclaim_announcement(MESSAGE_ID, lease), "its claimer may still publish"

        # The claimer died 31 s ago.
        claimed = await database.collection(IG_EXPORT_ANNOUNCEMENTS).find_one({"_id": MESSAGE_ID})
        assert claimed is not None
        await database.collection(IG_EXPORT_ANNOUNCEMENTS).update_one(
            {"_id": MESSAGE_ID}, {"$set": {"claimed_at": claimed["claimed_at"] - timedelta(seconds=31)}}
        )

        assert await handoffs.stale_announcements(lease) == [(MESSAGE_ID, "job-1.ig-pacs")]
        assert await handoffs.reclaim_announcement(MESSAGE_ID, lease)
        assert not await handoffs.reclaim_announcement(MESSAGE_ID, lease), "re-stamped: fresh again"
        assert await handoffs.stale_announcements(lease) == []
