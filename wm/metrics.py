"""Prometheus metrics, served at ``/metrics`` on the observability port of every process.

The per-process ones (deliveries, handler time, the bus connection) come from each process. The fleet
gauges (jobs and export tasks by state, oldest unfinished ones, queue and dead-letter depths) are read from
the database and the broker by the API process at scrape time (`wm.fleet`): alert on ``max`` of them
across API replicas. Other modules count events here (``LEASE_EXPIRIES.labels("export").inc()``) rather
than defining their own metric objects, so the dashboard and the alert rules have one list to follow.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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

BUS_CONNECTED = Gauge("mwm_bus_connected", "1 while this process's connection to RabbitMQ is open, else 0")
BUS_RECONNECTS = Counter("mwm_bus_reconnects_total", "Times this process's broker connection came back")
LEASE_EXPIRIES = Counter(
    "mwm_lease_expiries_total",
    "Leases that expired unreleased and were taken over by another holder",
    ["kind"],
)
FINISH_TAKEOVERS = Counter(
    "mwm_finish_takeovers_total", "Job ends claimed by a monitor that died and published by another"
)
JOBS = Gauge("mwm_jobs", "Jobs by state (fleet gauge, from the database)", ["state"])
EXPORT_TASKS = Gauge("mwm_export_tasks", "Export tasks by state (fleet gauge, from the database)", ["state"])
OLDEST_UNFINISHED = Gauge(
    "mwm_oldest_unfinished_age_seconds",
    "Age of the oldest job or export task not in a final state; 0 when there is none (fleet gauge)",
    ["kind"],
)
QUEUE_MESSAGES = Gauge(
    "mwm_queue_messages", "Ready messages in a consumer's queue (fleet gauge)", ["consumer"]
)
QUEUE_CONSUMERS = Gauge(
    "mwm_queue_consumers", "Consumers attached to a consumer's queue (fleet gauge)", ["consumer"]
)
DEAD_LETTERS = Gauge(
    "mwm_dead_letters", "Messages in a consumer's dead-letter queue (fleet gauge)", ["consumer"]
)
FLEET_SCRAPE_ERRORS = Counter(
    "mwm_fleet_scrape_errors_total", "Fleet gauge refreshes that failed (database or broker down)", ["source"]
)
