"""Prometheus metrics of the consumers, served at ``/metrics`` by every process."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CONSUMED = Counter("mwm_messages_consumed_total", "Deliveries taken from a queue", ["consumer"])
SUCCEEDED = Counter("mwm_messages_succeeded_total", "Deliveries handled and acknowledged", ["consumer"])
DUPLICATES = Counter("mwm_messages_duplicate_total", "Deliveries already handled before", ["consumer"])
FAILED = Counter("mwm_handler_failures_total", "Handler attempts that raised", ["consumer", "error"])
DEAD_LETTERED = Counter(
    "mwm_messages_dead_lettered_total", "Deliveries sent to the DLQ", ["consumer", "cause"]
)
PROCESSED_KEYS_UNWRITTEN = Counter(
    "mwm_processed_keys_unwritten_total",
    "Processed-message keys whose write failed (a redelivery of those messages re-runs the handler)",
)
HANDLER_SECONDS = Histogram(
    "mwm_handler_duration_seconds",
    "Time from delivery to settlement",
    ["consumer"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UNMATCHED_FILES = Counter("mwm_unmatched_files_total", "Arrived files no application matched", ["called_ae"])
