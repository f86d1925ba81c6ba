"""The API edge's errors, and what the domain's errors mean over HTTP: each becomes an
RFC 9457 problem (service/web/problems.py renders it)."""

from __future__ import annotations

from collections.abc import Collection

from service.domain.errors import (
    Conflict,
    DomainError,
    Forbidden,
    InvalidInput,
    NotFound,
    OtherEnvironment,
    Unauthenticated,
)
from service.web.problems import Problem, ProblemField

WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="tally"'}


def bad_request(errors: list[ProblemField], detail: str | None = None) -> Problem:
    """400 naming every offending parameter (the detail lists the first few)."""
    summary = detail or "; ".join(f"{e.name}: {e.detail}" for e in errors[:5])
    return Problem(400, "Bad Request", summary, slug="invalid-input", errors=errors)


def invalid(name: str, detail: str, location: str = "query") -> Problem:
    return bad_request([ProblemField(name, detail, location)], f"{name}: {detail}")


def payload_too_large(detail: str, *, close: bool = False) -> Problem:
    return Problem(413, "Content Too Large", detail, slug="payload-too-large", close=close)


def rate_limited(detail: str, headers: dict[str, str]) -> Problem:
    return Problem(429, "Too Many Requests", detail, slug="rate-limited", headers=headers)


def environment_detail(key_environment: str) -> str:
    return f"must be '{key_environment}' (the key's environment) or omitted"


def other_environment(detail: str, errors: list[ProblemField]) -> Problem:
    """403 naming where a request named an environment its key does not reach."""
    return Problem(403, "Forbidden", detail, slug="other-environment", errors=errors)


def from_domain(exc: DomainError, body_fields: Collection[str] = ()) -> Problem:
    """The problem a domain error is to an HTTP client. An invalid field is reported in the
    body when the route's body has a field of that name, else in the query."""
    if isinstance(exc, InvalidInput):
        # "filters.total_cost" is in the body when the body has "filters".
        in_body = exc.field.split(".", 1)[0] in body_fields
        return invalid(exc.field, exc.reason, "body" if in_body else "query")
    if isinstance(exc, NotFound):
        return Problem(404, "Not Found", exc.detail, slug="not-found")
    if isinstance(exc, Conflict):
        return Problem(409, "Conflict", exc.detail, slug="conflict")
    if isinstance(exc, Unauthenticated):
        return Problem(401, "Unauthorized", exc.detail, slug="unauthenticated", headers=dict(WWW_AUTHENTICATE))
    if isinstance(exc, OtherEnvironment):
        location = "body" if exc.field.split(".", 1)[0] in body_fields else "query"
        return other_environment(
            exc.detail, [ProblemField(exc.field, environment_detail(exc.key_environment), location)]
        )
    if isinstance(exc, Forbidden):
        return Problem(403, "Forbidden", exc.detail, slug="forbidden")
    return Problem(400, "Bad Request", exc.detail, slug="invalid-input")
