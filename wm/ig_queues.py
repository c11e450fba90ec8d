"""Queues on a MONAI Informatics Gateway's broker, for MWM's IG consumers.

The IG's messages have their own wire format (``wm.adapters.monai_ig.decode``) and live on the IG's vhost
and exchange (``ig_bus_settings``); this is where a consumer gets a ``QueueSource`` for them without
reaching into the adapter itself, and the publisher of the IG's export requests.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from schemas.monai_ig import IgMessage
from wm.adapters import monai_ig
from wm.config import IgSettings, Settings
from wm.ports import IgTaskPublisher
from wm.runtime import QueueSource


def ig_queue(model: type[IgMessage], routing_key: Callable[[IgSettings], str]) -> QueueSource:
    """A queue bound on the IG's exchange with the key ``routing_key`` reads from the IG settings, whose
    deliveries decode as the IG's ``model``."""
    return QueueSource(
        bus=monai_ig.ig_bus_settings,
        routing_keys=lambda settings: (routing_key(settings.ig),),
        decode=partial(monai_ig.decode, model=model),
    )


def ig_enabled(settings: Settings) -> bool:
    """Whether MWM works with an Informatics Gateway (``ig.enabled``): the IG consumers run only then."""
    return settings.ig.enabled


def ig_publisher(settings: Settings) -> IgTaskPublisher:
    """A publisher on the IG's broker and exchange (its connection kept by ``run``)."""
    return monai_ig.IgPublisher(settings)
