"""structlog set-up: ISO timestamps, context variables merged, JSON in production, readable in a terminal.

With JSON chosen, every line a process writes to stderr is one JSON object: MWM's own events, the
standard-library loggers of its dependencies (aiormq, aio-pika, uvicorn, pynetdicom, asyncio) rendered by
the same processors (``logger`` names the source), warnings, and uncaught exceptions in the main thread or
any other, each with its traceback in the ``exception`` field rather than on lines of its own.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import Any

import orjson
import structlog

_NOISY = ("aio_pika", "aiormq", "pynetdicom", "urllib3")
_json_lines = False


def json_lines() -> bool:
    """Whether this process writes its log as JSON lines (then so must its last words: `wm.console`)."""
    return _json_lines


def _orjson_text(document: Any, **options: Any) -> str:
    # orjson renders a log line several times faster than the standard library: one line per delivery.
    return orjson.dumps(document, **options).decode()


def configure_logging(log_format: str = "auto", level: str = "INFO") -> None:
    """Configure structlog and the standard library root logger once per process.

    ``auto`` renders for a person when stderr is a terminal and one JSON object per line otherwise
    (a container, a pipe, a file), so a deployment gets machine-readable logs without configuration.
    """
    global _json_lines
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    _json_lines = as_json
    renderer: structlog.types.Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_text)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # The standard library's records go through the same processors: one format for every line.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for own_handlers in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # A uvicorn started earlier in the process gave these loggers plain-text handlers of their own and a
        # level (its ``log_level``): they follow the root's handler and level again.
        named = logging.getLogger(own_handlers)
        for old in named.handlers[:]:
            named.removeHandler(old)
        named.propagate = True
        named.setLevel(logging.NOTSET)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    structlog.get_logger("wm").critical("uncaught_exception", exc_info=(kind, value, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or args.exc_type is SystemExit:
        return
    structlog.get_logger("wm").critical(
        "uncaught_exception_in_thread",
        thread=getattr(args.thread, "name", None),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
