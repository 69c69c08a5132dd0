"""Typed gateway errors and the one place that turns them into OpenAI-shaped responses.

Raise a GatewayError anywhere before a response has started; ErrorMiddleware renders it as
{"error": {"message", "type", "param", "code"}} with the right status and headers.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.gateway.codec import dumps

log = logging.getLogger("serving.gateway")


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    @property
    def kind(self) -> str:
        """Short error kind for the usage log and metrics."""
        return self.code or self.type


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


def model_not_found(model: str, param: str | None = None) -> NotFound:
    """A model not served here, or not to this tenant: the same answer, so a tenant learns nothing
    of the models kept from it."""
    return NotFound(
        f"model '{model}' is not served here; GET /v1/models lists the models",
        param=param,
        code="model_not_found",
    )


class TooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class Unavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "overloaded"


def store_unavailable(error: Exception, unchanged: str) -> Unavailable:
    """An admin change the state store could not take: nothing of it was made."""
    return Unavailable(
        f"{error}; {unchanged} was not changed", code="state_store_unavailable", retry_after=1
    )


def store_busy(what: str, tries: int) -> Unavailable:
    """An admin change that lost `tries` compare-and-set races in a row."""
    return Unavailable(
        f"the {what} in the state store changed {tries} times while this change was tried; "
        "retry it",
        code="state_store_busy",
        retry_after=1,
    )


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_unavailable"


def error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    return dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def render(error: GatewayError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = error_body(error.message, error.type, error.param, error.code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(error.retry_after).encode()))
    return error.status, headers, body


class ErrorMiddleware:
    """Renders GatewayError raised by the layers inside it; other errors become a logged 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except GatewayError as error:
            await self._send(scope, send, error)
        except Exception:
            # Logs the path and the traceback only: headers (and so keys) are never logged.
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            error = GatewayError("internal gateway error; see the gateway log")
            await self._send(scope, send, error)

    @staticmethod
    async def _send(scope: Scope, send: Send, error: GatewayError) -> None:
        exchange = scope.get("slipway.exchange")
        status, headers, body = render(error)
        if exchange is not None:
            exchange.status = error.status
            exchange.error_kind = error.kind
            headers.append((b"x-request-id", exchange.request_id.encode()))  # as answers carry
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path, wrong method) in the OpenAI error shape."""
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    body = error_body(message, "invalid_request_error", None, code)
    return Response(body, exc.status_code, headers=exc.headers, media_type="application/json")
