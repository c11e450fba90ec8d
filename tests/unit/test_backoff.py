"""The one backoff policy (``wm.domain.backoff``) every retrying layer uses."""

from __future__ import annotations

import pytest
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError

from wm.adapters.objectstore import request_retries
from wm.config import ObjectStoreSettings, RetrySettings
from wm.domain.backoff import delay_s
from wm.retry import backoff_delays


def test_delays_double_from_the_first_up_to_the_largest_plus_up_to_the_first_of_jitter() -> None:
    for retry, base in [(1, 0.2), (2, 0.4), (3, 0.8), (6, 6.4), (7, 10.0), (30, 10.0)]:
        delays = {delay_s(retry, 0.2, 10.0) for _ in range(30)}
        assert all(base <= delay <= min(base + 0.2, 10.0) for delay in delays), (retry, delays)
        assert base == 10.0 or len(delays) > 1, "replicas that failed together do not retry together"


def test_the_runtime_waits_between_its_attempts_on_the_same_policy() -> None:
    delays = list(backoff_delays(RetrySettings(attempts=10, initial_delay_s=0.2, max_delay_s=10.0)))
    assert len(delays) == 9
    assert 42.6 <= sum(delays) <= 43.8, "outlasts a restart of a service (6 to 33 s measured)"


def test_the_object_store_retries_a_request_on_the_same_policy() -> None:
    settings = ObjectStoreSettings(retry_attempts=4, retry_initial_delay_s=0.2, retry_max_delay_s=0.5)
    retry = request_retries(settings)
    waits = []
    for _ in range(settings.retry_attempts - 1):
        retry = retry.increment("GET", "/mwm/key", error=ConnectTimeoutError("down"))
        waits.append(retry.get_backoff_time())
    assert 0.2 <= waits[0] <= 0.4 and 0.4 <= waits[1] <= 0.5 and waits[2] == 0.5, waits
    with pytest.raises(MaxRetryError):  # the fourth failure: no attempt left
        retry.increment("GET", "/mwm/key", error=ConnectTimeoutError("down"))
