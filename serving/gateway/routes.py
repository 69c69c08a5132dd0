"""The OpenAI-compatible endpoints: completions (the hot path, raw ASGI), models, health, ready."""

from __future__ import annotations

from time import monotonic

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from serving.gateway.choice import choose, fallback, point_for
from serving.gateway.codec import dumps
from serving.gateway.errors import GatewayError, NotFound, TooLarge, Unavailable, UpstreamError
from serving.gateway.proxy import AttemptFailed
from serving.gateway.validation import parse_request, prompt_text


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise GatewayError("client disconnected while sending the request", status=499, code="client_disconnected")
        body += message.get("body", b"")
        if len(body) > limit:
            raise _too_large(len(body), limit)
        if not message.get("more_body", False):
            return body


def _too_large(size: int, limit: int) -> TooLarge:
    return TooLarge(f"request body of {size} bytes is over this gateway's limit of {limit} bytes")


class Completions:
    """POST /v1/chat/completions or /v1/completions: check, route, relay; retry a failed canary on stable."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.chat = endpoint == "chat"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = scope["state"]["gateway"]
        exchange = scope["slipway.exchange"]
        data = parse_request(await read_body(scope, receive, gateway.max_body_bytes), self.endpoint)
        model = exchange.model = data["model"]
        route = gateway.table.get(model)
        if route is None:
            raise NotFound(
                f"model '{model}' is not served here; GET /v1/models lists the models",
                param="model",
                code="model_not_found",
            )
        tenant = exchange.tenant
        if tenant.log_prompts:
            exchange.prompt = prompt_text(data, self.endpoint)
        strip_usage = False
        if data.get("stream"):
            exchange.stream = True
            # Ask for the usage event so streams are counted too; drop it again if unasked.
            options = data.get("stream_options")
            if options is None:
                data["stream_options"] = {"include_usage": True}
                strip_usage = True
            elif not options.get("include_usage"):
                options["include_usage"] = True
                strip_usage = True
        session = header(scope, b"x-session-id")
        point = point_for(session.decode("utf-8", "replace") if session is not None else data.get("user"))
        if route.audience == "opted_in":  # a rollout's tenant-first stage
            canary = tenant.canary == "in"
        else:
            canary = (tenant.canary or gateway.canary_default) == "in"
        backend = choose(route, point, canary)
        try:
            await self._attempt(gateway, exchange, backend, data, strip_usage, send, receive)
            return
        except AttemptFailed as failure:
            if backend.role != "canary":
                await _answer_failure(exchange, failure, send)
                return
            first_failure = failure
        try:
            stable = fallback(route, backend, point, monotonic())
        except Unavailable:
            await _answer_failure(exchange, first_failure, send)
            return
        try:
            await self._attempt(gateway, exchange, stable, data, strip_usage, send, receive)
        except AttemptFailed as failure:
            await _answer_failure(exchange, failure, send)

    async def _attempt(self, gateway, exchange, backend, data, strip_usage, send, receive) -> None:
        exchange.backend = backend
        data["model"] = backend.served_model
        url = backend.url_chat if self.chat else backend.url_completions
        await gateway.upstream.forward(exchange, backend, url, dumps(data), strip_usage, send, receive)


async def _answer_failure(exchange, failure: AttemptFailed, send: Send) -> None:
    """A backend's own error answer passes through unchanged; a missing answer becomes 502/504."""
    if failure.status is None:
        status = 504 if failure.kind == "upstream_timeout" else 502
        raise UpstreamError(failure.message, code=failure.kind, status=status)
    exchange.status = failure.status
    exchange.error_kind = failure.kind
    headers = [
        (b"content-type", failure.content_type),
        (b"content-length", str(len(failure.body or b"")).encode()),
        (b"x-request-id", exchange.request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": failure.status, "headers": headers})
    await send({"type": "http.response.body", "body": failure.body or b""})


def _json(data: object, status: int = 200) -> Response:
    return Response(dumps(data), status, media_type="application/json")


def _model_entry(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "slipway"}


async def list_models(request: Request) -> Response:
    gateway = request.state.gateway
    data = [_model_entry(name, gateway.created) for name in sorted(gateway.table.routes)]
    return _json({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    gateway = request.state.gateway
    name = request.path_params["model"]
    if gateway.table.get(name) is None:
        raise NotFound(f"model '{name}' is not served here; GET /v1/models lists the models", code="model_not_found")
    return _json(_model_entry(name, gateway.created))


async def health(request: Request) -> Response:
    return _json({"status": "ok"})


async def ready(request: Request) -> Response:
    """Ready when every model has a stable backend whose circuit is closed."""
    gateway = request.state.gateway
    problems = [
        f"model '{name}': no stable backend with a closed circuit"
        for name, route in gateway.table.routes.items()
        if not any(b.breaker.opened_at is None for b in route.stable.backends)
    ]
    if not gateway.table.routes:
        problems.append("no routes: add one with PUT /admin/routes/{model}")
    return _json({"status": "not ready" if problems else "ready", "problems": problems}, 503 if problems else 200)
