"""The core's exceptions. The HTTP edge maps each to an RFC 9457 problem; the consumer to a
dead-letter reason or a retry."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FieldError:
    name: str
    detail: str
    location: str = "query"  # query, body, path, header

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "in": self.location, "detail": self.detail}


class TallyError(Exception):
    """Base of every error the core raises on purpose."""

    status = 500
    title = "Internal Server Error"
    slug = "internal"

    def __init__(
        self, detail: str = "", *, errors: list[FieldError] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.errors = errors or []
        self.headers = headers or {}


class InvalidInput(TallyError):
    status = 400
    title = "Bad Request"
    slug = "invalid-input"

    @classmethod
    def for_field(cls, name: str, detail: str, location: str = "query") -> "InvalidInput":
        return cls(f"{name}: {detail}", errors=[FieldError(name, detail, location)])


class Unauthenticated(TallyError):
    status = 401
    title = "Unauthorized"
    slug = "unauthenticated"


class Forbidden(TallyError):
    status = 403
    title = "Forbidden"
    slug = "forbidden"


class NotFound(TallyError):
    status = 404
    title = "Not Found"
    slug = "not-found"


class Conflict(TallyError):
    status = 409
    title = "Conflict"
    slug = "conflict"


class PayloadTooLarge(TallyError):
    status = 413
    title = "Content Too Large"
    slug = "payload-too-large"


class RateLimited(TallyError):
    status = 429
    title = "Too Many Requests"
    slug = "rate-limited"


class Unavailable(TallyError):
    """A dependency (database, broker) cannot be reached; the caller may retry."""

    status = 503
    title = "Service Unavailable"
    slug = "unavailable"
