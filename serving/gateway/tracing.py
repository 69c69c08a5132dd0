"""Traces: OpenTelemetry spans of each API request, sent to a collector by OTLP/HTTP.

One trace per request, its spans (names as exported):
  POST /v1/chat/completions   SERVER: the whole request; the child of the client's span where
                              it sent a W3C traceparent (else a new trace, kept at
                              tracing.sample_ratio)
    gateway.auth              the tenant's key (or JWT) checked
    gateway.admission         the tenant's limits checked and its reservation held (limits.py)
    gateway.queue             waiting for a backend's slot: only a request that waited (queue.py)
    gateway.upstream          CLIENT: one try on one backend, from its send to its last byte; a
                              retry is a second one. Its context goes to the backend in the
                              request's traceparent header, so vLLM's own spans are its children
      gateway.relay           the answer passed to the client, from the backend's response on
Attributes name the tenant, model, endpoint, backend version and role, replica, statuses, error
kinds and token counts; never a key, a header or a prompt. The usage log row carries the trace id
(usage.py: trace_id) of a recorded trace. A mirrored copy (mirror.py) is not traced.

Off (no tracing.endpoint) it costs nothing: build_app makes no Tracing, adds no middleware, and
every traced step tests `exchange.trace is None` once and goes on as before: no span is made and no
traceparent is sent. On, every part is given the tracer explicitly: the SDK's global tracer
provider is neither read nor set. Spans are exported in batches from the SDK's own thread
(BatchSpanProcessor), off the event loop; shutdown (lifespan end) sends what is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Receive, Scope, Send

from configs.gateway import TracingSpec
from serving.gateway.attempt import AttemptFailed
from serving.gateway.errors import GatewayError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from serving.gateway.attempt import Attempt
    from serving.gateway.exchange import Exchange

T = TypeVar("T")
_CONTEXT = TraceContextTextMapPropagator()
_W3C = {b"traceparent": "traceparent", b"tracestate": "tracestate"}
JSON = {"Content-Type": "application/json"}  # what every upstream request carries (proxy.py)


class Tracing:
    """The gateway's tracer: made (with its exporter and export thread) in `open`, flushed and
    stopped in `close`. Made only when tracing.endpoint is set."""

    def __init__(self, spec: TracingSpec) -> None:
        assert spec.endpoint is not None, "tracing is off: build no Tracing"
        self.spec = spec
        self.provider: TracerProvider | None = None
        self.tracer: Tracer | None = None

    async def open(self) -> None:
        # Imported here: a gateway with tracing off never loads the SDK or the exporter.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        spec = self.spec
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(spec.sample_ratio)),
            resource=Resource.create({"service.name": spec.service_name}),
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=spec.endpoint, timeout=10))
        )
        self.tracer = self.provider.get_tracer("serving.gateway")

    async def close(self) -> None:
        if self.provider is not None:
            # Sends the spans still queued (a blocking HTTP post): in a thread, off the loop.
            await asyncio.to_thread(self.provider.shutdown)
            self.provider = self.tracer = None

    def begin(self, scope: Scope, exchange: Exchange) -> RequestTrace:
        """The request's root span, the child of the client's traceparent where it sent one."""
        carrier = {}
        for name, value in scope["headers"]:
            if name in _W3C:
                carrier[_W3C[name]] = value.decode("latin-1")
        # No traceparent: a new trace, whatever context this thread may hold.
        parent = _CONTEXT.extract(carrier, Context()) if carrier else Context()
        root = self.tracer.start_span(
            f"{scope['method']} {scope['path']}",
            parent,
            SpanKind.SERVER,
            {
                "http.request.method": scope["method"],
                "url.path": scope["path"],
                "slipway.request_id": exchange.request_id,
                "slipway.endpoint": exchange.endpoint,
            },
        )
        trace = RequestTrace(self.tracer, root)
        if trace.sampled:
            exchange.trace_id = f"{root.get_span_context().trace_id:032x}"
        return trace


class RequestTrace:
    """One request's trace: its root span, and the child spans its steps open under it."""

    __slots__ = ("attempts", "context", "root", "sampled", "tracer")

    def __init__(self, tracer: Tracer, root: Span) -> None:
        self.tracer = tracer
        self.root = root
        self.context = set_span_in_context(root)
        self.sampled = root.get_span_context().trace_flags.sampled
        self.attempts = 0

    def _child(
        self, name: str, attributes: Mapping[str, Any] | None = None, context: Context | None = None
    ) -> Span:
        return self.tracer.start_span(
            name,
            self.context if context is None else context,
            attributes=attributes,
            record_exception=False,
        )

    def call(self, name: str, step: Callable[..., T], *args: Any) -> T:
        """`step(*args)` in a child span named `name` (the tenant's authentication)."""
        span = self._child(name)
        try:
            return step(*args)
        except BaseException as error:
            _failed(span, error)
            raise
        finally:
            span.end()

    async def within(
        self,
        name: str,
        step: Awaitable[T],
        attributes: Mapping[str, Any] | None = None,
        parent: Span | None = None,
    ) -> T:
        """Await `step` in a span named `name`, the root's child (admission, the wait for a slot)
        or `parent`'s."""
        context = self.context if parent is None else set_span_in_context(parent)
        span = self._child(name, attributes, context)
        try:
            return await step
        except BaseException as error:
            _failed(span, error)
            raise
        finally:
            span.end()

    async def upstream(
        self,
        attempt: Attempt,
        post: Callable[[Attempt, Send, Receive, Mapping[str, str], Any], Awaitable[None]],
        send: Send,
        receive: Receive,
    ) -> None:
        """`post` (Upstream._exchange) the attempt in a CLIENT span, its context in the request's
        traceparent header; the relay of its answer is that span's child (UpstreamSpan.relay)."""
        self.attempts += 1
        backend, replica = attempt.backend, attempt.replica
        span = self.tracer.start_span(
            "gateway.upstream",
            self.context,
            SpanKind.CLIENT,
            {
                "slipway.attempt": self.attempts,
                "slipway.version": backend.version,
                "slipway.role": backend.role,
                "slipway.replica": replica.url,
                "url.full": attempt.url,
            },
            record_exception=False,
        )
        headers = {**JSON, **traceparent(span)}
        try:
            await post(attempt, send, receive, headers, UpstreamSpan(self, span))
        except BaseException as error:
            _failed(span, error)
            raise
        finally:
            span.end()

    def end(self, exchange: Exchange) -> None:
        """Close the root span with what the request came to (read from its Exchange)."""
        root = self.root
        tenant, backend = exchange.tenant, exchange.backend
        status, error_kind = exchange.status, exchange.error_kind
        if status == 0:  # the request was cancelled: as the usage log records it (usage.py)
            status, error_kind = 499, error_kind or "cancelled"
        attributes: dict[str, Any] = {
            "http.response.status_code": status,
            "slipway.stream": exchange.stream,
        }
        if tenant is not None:
            attributes["slipway.tenant"] = tenant.name
        if exchange.model is not None:
            attributes["slipway.model"] = exchange.model
        if backend is not None:
            attributes["slipway.version"] = backend.version
            attributes["slipway.role"] = backend.role
        if exchange.failover:
            attributes["slipway.failover"] = True
        if exchange.tokens_from is not None:
            attributes["slipway.tokens_from"] = exchange.tokens_from
        if exchange.prompt_tokens or exchange.completion_tokens:
            attributes["gen_ai.usage.input_tokens"] = exchange.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = exchange.completion_tokens
        if error_kind is not None:
            attributes["error.type"] = error_kind
        root.set_attributes(attributes)
        if status >= 500:  # a server span's error: the gateway's or its backend's
            root.set_status(Status(StatusCode.ERROR, error_kind))
        root.end()


class UpstreamSpan:
    """What an attempt's relay is given: its CLIENT span, for the relay's child span."""

    __slots__ = ("span", "trace")

    def __init__(self, trace: RequestTrace, span: Span) -> None:
        self.trace = trace
        self.span = span

    async def relay(self, status: int, relaying: Awaitable[None]) -> None:
        """Await the relay of an answer with HTTP `status` in the span gateway.relay."""
        span = self.span
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_status(Status(StatusCode.ERROR, f"upstream_{status}"))
        await self.trace.within("gateway.relay", relaying, None, span)


def traceparent(span: Span) -> dict[str, str]:
    """The W3C trace context headers that make the receiver's spans children of `span`."""
    context = span.get_span_context()
    headers = {
        "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-"
        f"{context.trace_flags:02x}"
    }
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()
    return headers


def _failed(span: Span, error: BaseException) -> None:
    """Mark a span failed with a short code: the exception's message is not recorded (it may
    quote what a client sent)."""
    if isinstance(error, AttemptFailed | GatewayError):
        kind = error.kind
    elif isinstance(error, asyncio.CancelledError):
        kind = "cancelled"
    else:
        kind = type(error).__name__
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, kind))


class TracingMiddleware:
    """Opens each API request's trace (Exchange.trace) and closes it with the request. Added
    only when tracing is on, inside UsageMiddleware (which makes the Exchange)."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = scope.get("slipway.exchange") if scope["type"] == "http" else None
        if exchange is None:
            await self.app(scope, receive, send)
            return
        trace = exchange.trace = self.tracing.begin(scope, exchange)
        try:
            await self.app(scope, receive, send)
        finally:
            trace.end(exchange)
            exchange.trace = None  # the usage log keeps only the trace id
