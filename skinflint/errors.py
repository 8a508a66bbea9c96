"""Every error skinflint raises, each knowing its HTTP status and OpenAI error type.

    SkinflintError                      500 api_error
    ├── ConfigError                     (start-up only; names the offending key)
    ├── RequestError                    400 invalid_request_error
    │   ├── BodyTooLargeError           413
    │   ├── UnknownModelError           404 model_not_found
    │   ├── NotFoundError               404 not_found (a job, file or batch)
    │   ├── AuthenticationError         401 authentication_error
    │   └── BudgetExceededError         429 budget_exceeded (with Retry-After)
    ├── ShuttingDownError               503 shutdown (the server stopped before answering)
    ├── BudgetStoreError                503 budget_store_unavailable
    ├── JobStoreError                   503 job_store_unavailable
    └── UpstreamError                   502 upstream_error (a provider failed)
        ├── UpstreamStatusError         the provider's own 4xx/5xx, relayed with its status
        ├── UpstreamTimeoutError        504 timeout
        ├── UpstreamConnectionError     502 connection_error
        ├── UpstreamProtocolError       502 bad upstream payload or a cut stream
        └── UpstreamUnavailableError    503 upstream_unavailable (circuit open, Retry-After)

The server renders any of them with :func:`SkinflintError.to_body`; upstream keys never appear in
messages because providers build messages from status codes and vendor error text only.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "BodyTooLargeError",
    "BudgetExceededError",
    "BudgetStoreError",
    "ConfigError",
    "JobStoreError",
    "NotFoundError",
    "RequestError",
    "ShuttingDownError",
    "SkinflintError",
    "UnknownModelError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
]


class SkinflintError(Exception):
    status: int = 500
    error_type: str = "api_error"
    code: str | None = None
    retry_after: float | None = None  # seconds, sent as Retry-After when set

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def retryable(self) -> bool:
        return False

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "code": self.code,
                "param": None,
            }
        }


class ConfigError(SkinflintError):
    """Invalid configuration; raised at start-up, never while serving."""


class RequestError(SkinflintError):
    status = 400
    error_type = "invalid_request_error"


class BodyTooLargeError(RequestError):
    status = 413
    code = "request_too_large"


class UnknownModelError(RequestError):
    status = 404
    code = "model_not_found"


class NotFoundError(RequestError):
    status = 404
    code = "not_found"


class AuthenticationError(RequestError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ShuttingDownError(SkinflintError):
    """The server is stopping and cancelled a request still running (a second Ctrl-C, or the
    graceful-shutdown timeout ran out); the client may retry against another server."""

    status = 503
    error_type = "server_error"
    code = "shutdown"


class BudgetExceededError(RequestError):
    """A budget with ``action: block`` would be passed. ``retry_after``: seconds until its
    window resets, sent as ``Retry-After``."""

    status = 429
    error_type = "budget_exceeded"
    code = "budget_exceeded"

    def __init__(self, message: str, *, budget: str, retry_after: float) -> None:
        super().__init__(message)
        self.budget = budget
        self.retry_after = retry_after


class BudgetStoreError(SkinflintError):
    """The budget counters could not be read or written in time (the SQLite file locked past
    its busy timeout, the Redis or PostgreSQL server unreachable). A request whose budgets
    cannot be checked is refused rather than let through unchecked."""

    status = 503
    error_type = "server_error"
    code = "budget_store_unavailable"
    retry_after = 1.0


class JobStoreError(SkinflintError):
    """The job store could not be read or written (the SQLite file locked past its busy
    timeout, the PostgreSQL server unreachable): a deferred request is not accepted unless it
    is stored."""

    status = 503
    error_type = "server_error"
    code = "job_store_unavailable"
    retry_after = 1.0


class UpstreamError(SkinflintError):
    status = 502
    error_type = "upstream_error"

    def __init__(self, message: str, *, provider: str = "", code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.provider = provider


class UpstreamStatusError(UpstreamError):
    """The provider answered with an error status; relayed to the client with that status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        provider: str = "",
        error_type: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, code=code)
        self.status = status
        self.retry_after = retry_after
        if error_type:
            self.error_type = error_type
        elif status == 429:
            self.error_type = "rate_limit_error"
        elif status < 500:
            self.error_type = "invalid_request_error"

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


class UpstreamTimeoutError(UpstreamError):
    status = 504
    error_type = "timeout"

    @property
    def retryable(self) -> bool:
        return True


class UpstreamConnectionError(UpstreamError):
    error_type = "connection_error"

    @property
    def retryable(self) -> bool:
        return True


class UpstreamProtocolError(UpstreamError):
    """The provider sent something we cannot read, or cut an answer short. Retryable: before
    the client has seen any of it, another try may well succeed."""

    @property
    def retryable(self) -> bool:
        return True


class UpstreamUnavailableError(UpstreamError):
    """The provider's circuit is open after failing repeatedly: the call was not made.
    ``retry_after``: seconds until it is tried again, sent as ``Retry-After``."""

    status = 503
    error_type = "upstream_error"
    code = "upstream_unavailable"

    def __init__(self, message: str, *, provider: str, retry_after: float) -> None:
        super().__init__(message, provider=provider)
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return True  # another target may be healthy
