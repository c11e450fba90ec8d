"""The one error tree of MWM. Only the runtime and the API map these to outcomes.

``MwmError``
  ``TransientError``: a dependency is down or slow (database, broker, object store, Argo, a timeout).
    The runtime retries the handler with backoff, a bounded number of times, then dead-letters it.
  ``PermanentError``: the input can never succeed (an invalid event, an unknown application, a DICOM file
    that cannot be parsed). Dead-lettered at once with its reason.
    ``InvalidMessage``: the message body or properties fail validation.
    ``ValidationFailed``: a definition (application, sink) is invalid; carries every error found.
  ``Duplicate``: the effect already happened; acknowledged and logged.
  ``NotFound`` / ``Conflict``: become RFC 7807 responses (404 / 409) in the API.
  ``ConfigurationError``: a setting is invalid or unusable (a port in use); the command prints its one
    line, naming the variable, and exits 1.

Anything else raised by a handler is a bug: the runtime dead-letters the message and logs it loudly.
Adapters translate library exceptions to these at the edge.
"""

from __future__ import annotations

from pydantic import ValidationError


class MwmError(Exception):
    """Base class of every error MWM raises on purpose."""


class TransientError(MwmError):
    """A dependency failed in a way that may pass: retry with backoff."""


class PermanentError(MwmError):
    """Retrying cannot help: dead-letter with this reason."""


class InvalidMessage(PermanentError):
    """A bus message that fails validation (not JSON, wrong schema, missing properties)."""

    @classmethod
    def from_validation(cls, what: str, exc: ValidationError) -> InvalidMessage:
        """The body did not validate as ``what``: every failing field, with its path, in one reason."""
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        return cls(f"{what} failed validation: {problems}")


class ValidationFailed(PermanentError):
    """A definition failed validation; ``errors`` lists every problem, each naming its field."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


class Duplicate(MwmError):
    """The effect was already applied (a unique key exists): acknowledge, do nothing."""


class NotFound(MwmError):
    """The named thing does not exist."""


class Conflict(MwmError):
    """The request conflicts with the current state (a name taken, an illegal transition)."""


class ConfigurationError(MwmError):
    """A setting that is invalid or cannot be used; the message names its ``MWM_*`` variable."""
