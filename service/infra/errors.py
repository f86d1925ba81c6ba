"""Infrastructure errors."""

from __future__ import annotations


class Unavailable(Exception):
    """A dependency (database, broker) cannot be reached or did not answer in time; the
    caller may retry."""

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
