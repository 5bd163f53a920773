"""Error families, as in h11: the caller's bad or untimely request (`Refused`, answered with a status), the
kernel refusing a change (`EnforcementFailed`, retried until it holds), and our own bug (`CoreBug` in the
core, or any other exception: answered INTERNAL, never with its text).

`Refused` carries a status hint named like gRPC's codes so that adapters translate it without guessing, and
the field it is about.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    ABORTED = "ABORTED"
    UNAVAILABLE = "UNAVAILABLE"
    UNIMPLEMENTED = "UNIMPLEMENTED"


class Refused(Exception):
    """The request is not carried out; nothing was written."""

    def __init__(self, status: Status, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.field = field
        self.message = message


def invalid(field: str, message: str) -> Refused:
    return Refused(Status.INVALID_ARGUMENT, message, field=field)


class EnforcementFailed(Exception):
    """The kernel refused an enforcement change; the driver keeps retrying until it holds."""


class JobFailed(Exception):
    """A request failed on our side (a bug or a store error) before it changed anything; it was rolled back and
    logged. Answered INTERNAL without details."""


class StartupError(Exception):
    """The daemon cannot start as configured (a file it needs is missing, unreadable, or not what it should be).
    The message is one line that names the file and says what to do; it is shown without a traceback."""


class StorageFailed(Exception):
    """The database could not be written (a full disk, an I/O error). Nothing of the request was kept; what was
    committed before, and the kernel's enforcement of it, still hold. Answered UNAVAILABLE."""
