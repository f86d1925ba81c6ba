"""The domain's errors: plain exceptions that say what went wrong and, for invalid input,
which field. What they mean to a caller is the edges' business: the HTTP API maps them to
problem+json (service/api/errors.py), the CLI prints them."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(DomainError):
    """A value the domain cannot accept, named by ``field``."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.reason = detail


class NotFound(DomainError):
    """No such thing — also when it belongs to another organization."""


class Conflict(DomainError):
    """The change contradicts what exists."""


class Unauthenticated(DomainError):
    """No valid credential."""


class Forbidden(DomainError):
    """A valid credential without the right to do this."""


class OtherEnvironment(Forbidden):
    """A request (or an event sent with a key) names an environment other than its key's:
    prod and test are separate worlds, as live and test keys are at payment providers, so a
    key reaches its own environment only. ``field`` names where the request named it."""

    def __init__(self, field: str, key_environment: str, named: str) -> None:
        super().__init__(
            f"this key is for the '{key_environment}' environment and cannot reach '{named}'"
            f" (use a key made with --environment {named})"
        )
        self.field = field
        self.key_environment = key_environment
