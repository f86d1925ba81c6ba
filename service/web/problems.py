"""Every error leaves as RFC 9457 ``application/problem+json`` with the request id."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from service.infra import logs
from service.infra.errors import Unavailable, is_transient

log = logging.getLogger("tally.api")

PROBLEM_TYPE_BASE = "https://tally.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"
REQUEST_ID = web.RequestKey("request_id", str)
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class ProblemField:
    """One offending parameter: its name as the client wrote it, where, and what is wrong."""

    name: str
    detail: str
    location: str = "query"  # query, body, path, header

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "in": self.location, "detail": self.detail}


class Problem(Exception):
    """An HTTP refusal, answered as RFC 9457 problem+json by :func:`problem_middleware`."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        slug: str | None = None,
        errors: list[ProblemField] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, object] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.slug = status, title, detail, slug
        self.errors = errors or []
        self.headers = headers or {}
        self.extra = extra or {}
        # Close the connection after the answer: the request's body was refused unread, and
        # reading it only to keep the connection alive would cost what refusing it saved.
        self.close = close

    def response(self, request: web.Request) -> web.Response:
        """The problem+json answer to ``request``."""
        body = problem_body(
            self.status,
            self.title,
            self.detail,
            instance=request.path,
            request_id=request.get(REQUEST_ID, ""),
            slug=self.slug,
            errors=self.errors,
            extra=self.extra,
        )
        response = web.Response(body=body, status=self.status, content_type=PROBLEM_CONTENT_TYPE, headers=self.headers)
        if self.close:
            response.force_close()
        return response


_STATUS_SLUGS = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    408: "request-timeout",
    413: "payload-too-large",
    414: "uri-too-long",
    429: "rate-limited",
    431: "header-fields-too-large",
}


def problem_body(
    status: int,
    title: str,
    detail: str,
    *,
    instance: str | None,
    request_id: str,
    slug: str | None = None,
    errors: list[ProblemField] | None = None,
    extra: dict[str, object] | None = None,
) -> bytes:
    """The RFC 9457 document every refusal carries (``instance`` is None when the request
    was too malformed to have a path)."""
    body: dict[str, object] = {
        "type": PROBLEM_TYPE_BASE + (slug or _STATUS_SLUGS.get(status, "error")),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        "request_id": request_id,
        "errors": [e.as_dict() for e in errors or []],
        **(extra or {}),
    }
    return orjson.dumps(body)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = incoming if _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
    token = logs.REQUEST_ID.set(request[REQUEST_ID])
    try:
        response = await handler(request)
    finally:
        logs.REQUEST_ID.reset(token)
    response.headers["X-Request-ID"] = request[REQUEST_ID]
    return response


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        return exc.response(request)
    except Unavailable as exc:
        return Problem(
            503,
            "Service Unavailable",
            exc.detail,
            slug="unavailable",
            headers={"Retry-After": str(exc.retry_after)},
        ).response(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return Problem(exc.status, exc.reason, _detail(request, exc), headers=_allow_header(exc)).response(request)
    except web.RequestPayloadError as exc:
        # The client's body could not be decoded (a bad chunk, a Content-Encoding that is not
        # what it says): its fault, one warning line, never an error with a traceback.
        log.warning("refused a malformed request body", extra={"path": request.path, "reason": _reason(exc)})
        return Problem(400, "Bad Request", f"malformed request body: {_reason(exc)}", slug="invalid-body").response(
            request
        )
    except Exception as exc:
        if not is_transient(exc):
            log.exception("unhandled error", extra={"path": request.path})
            return Problem(500, "Internal Server Error", "unexpected error; quote the request_id").response(request)
        if request.transport is None or request.transport.is_closing():
            # The client's own connection went (mid-body, say): no dependency failed, and no
            # one will read the answer.
            log.debug("client connection lost: %s", type(exc).__name__)
        else:
            # A dependency failed for now (a statement past the API pool's statement_timeout,
            # TALLY_DB_COMMAND_TIMEOUT, included): the caller should retry, so 503, not 500.
            log.warning("dependency unavailable: %s", type(exc).__name__)
        return Problem(
            503,
            "Service Unavailable",
            "a dependency is unavailable; retry shortly",
            slug="unavailable",
            headers={"Retry-After": "1"},
        ).response(request)


def _reason(exc: BaseException) -> str:
    """The first line of an aiohttp payload error's message, ASCII and bounded."""
    cause = exc.__cause__ or exc
    message = str(getattr(cause, "message", "") or cause).strip().splitlines()
    return (message[0] if message else type(cause).__name__).encode("ascii", "backslashreplace").decode()[:200]


def _detail(request: web.Request, exc: web.HTTPException) -> str:
    """What to do about a refusal aiohttp's router made (its own text is "405: Method Not Allowed")."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    if isinstance(exc, web.HTTPNotFound) and exc.text in (None, "", "404: Not Found"):
        return f"no route {request.method} {request.path}; the routes are listed at /docs"
    return exc.text or exc.reason


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


def json_response(value: object, status: int = 200) -> web.Response:
    """A JSON body in the one style every tally response uses: orjson's compact form (the
    same as PostgreSQL's row_to_json, which renders customers)."""
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")
