"""How a command ends on an error a person can act on: one line on stderr, no traceback, exit 1.

- An invalid setting (pydantic's validation of `wm.config.Settings`): ``error: invalid setting
  MWM_BUS__PREFETCH='many': Input should be a valid integer, ...``, one line per invalid variable.
- A setting that cannot be used (a port in use) and any other `wm.errors.MwmError` that reaches the top:
  ``error: <its message>``, also when it ends a task group.
- With JSON logs (a role, `wm.logging`), that line is a JSON object (``command_failed``) like every other.
- A closed pipe (``mwm jobs list | head``, ``python -m wm.config | head``): nothing more is written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import structlog
from pydantic import ValidationError

from wm.errors import MwmError
from wm.logging import json_lines

SETTINGS_MODEL = "Settings"


def run_command(entry: Callable[[], object]) -> None:
    """Call ``entry``, ending the process with one line for the errors above."""
    try:
        entry()
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
    except BrokenPipeError:
        _drop_stdout()
        sys.exit(1)
    except ValidationError as exc:
        if exc.title != SETTINGS_MODEL:
            raise
        for line in setting_errors(exc):
            _say(line)
        sys.exit(1)
    except (MwmError, ExceptionGroup) as exc:
        cause = _actionable(exc)
        if cause is None:
            raise
        _say(str(cause))
        sys.exit(1)


def _say(message: str) -> None:
    if json_lines():  # a role whose log is JSON lines ends with one too
        structlog.get_logger("wm").error("command_failed", error=message)
    else:
        print(f"error: {message}", file=sys.stderr)


def setting_errors(exc: ValidationError) -> list[str]:
    """Each invalid setting as ``MWM_SECTION__FIELD='value': what is wrong``."""
    lines = []
    for error in exc.errors(include_url=False):
        variable = "MWM_" + "__".join(str(part).upper() for part in error["loc"])
        lines.append(f"invalid setting {variable}={error.get('input')!r}: {error['msg']}")
    return lines


def _actionable(exc: BaseException) -> MwmError | None:
    if isinstance(exc, MwmError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _actionable(inner)
            if found is not None:
                return found
    return None


def _drop_stdout() -> None:
    # The reader is gone: point stdout at /dev/null so the interpreter's final flush cannot fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
