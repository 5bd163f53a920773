"""Errors about one field of a request, raised by the factor checks and turned into INVALID_ARGUMENT."""

from __future__ import annotations


class FieldError(ValueError):
    """`field` (a dotted request path, e.g. "totp.secret") is unusable; `message` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
