"""Traces (tracing.py): each API request's spans reach an OTLP/HTTP receiver as one tree, the
backend gets the trace context in a traceparent header, a client's traceparent is continued, the
usage row carries the trace id; with tracing off no span is made and no traceparent is sent."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator

import httpx
import psycopg2
import pytest
from opentelemetry.sdk.trace import _Span
from opentelemetry.trace import NonRecordingSpan
from pydantic import ValidationError

from configs.gateway import GatewayConfig, TracingSpec
from evaluation.benchmarks.mock_upstream import Fault
from serving.gateway.auth import key_hash
from serving.gateway.usage import USAGE, Table, read_usage
from tests.serving.conftest import MODEL, backend, chat, post_many
from tests.serving.otlp import CLIENT, ERROR, SERVER, Collector, Span, collector

SERVICE = "gateway-under-test"
ROOT = "POST /v1/chat/completions"
CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture
def otlp() -> Iterator[Collector]:
    with collector() as received:
        yield received


def traced(otlp: Collector, **fields: object) -> dict:
    return {"tracing": {"endpoint": otlp.url, "service_name": SERVICE, **fields}}


def upstream_headers(upstream) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in pairs} for pairs in upstream.headers]


def sampled(traceparent: str) -> bool:
    """Whether a W3C traceparent's flags say sampled (its other bits may be set: 'random')."""
    return bool(int(traceparent.split("-")[3], 16) & 1)


def children(spans: list[Span], parent: Span) -> dict[str, Span]:
    found = [s for s in spans if s.parent_id == parent.span_id]
    assert len({s.name for s in found}) == len(found), [s.name for s in found]
    return {s.name: s for s in found}


def only_root(spans: list[Span]) -> Span:
    roots = [s for s in spans if s.name == ROOT]
    assert len(roots) == 1, roots
    return roots[0]


def within(child: Span, parent: Span) -> bool:
    return parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_is_one_span_tree_whose_context_reaches_the_backend(
    mock, keys, run_gateway, otlp, stream
):
    upstream, url = mock
    start = time.time()
    config = keys.config([backend(url, "1")], **traced(otlp))
    key = keys.key("alice")
    with run_gateway(config) as base:
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json=chat("secret prompt words", stream=stream),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200
    # The gateway has stopped: its spans were all sent (shutdown flushes them).
    assert otlp.posts and all(path == "/v1/traces" for path, _ in otlp.posts)
    spans = otlp.of(SERVICE)
    root = only_root(spans)
    assert root.kind == SERVER and root.parent_id == ""
    assert {s.trace_id for s in spans} == {root.trace_id}
    assert root.attributes["slipway.tenant"] == "alice"
    assert root.attributes["slipway.model"] == MODEL
    assert root.attributes["slipway.version"] == "1"
    assert root.attributes["slipway.role"] == "stable"
    assert root.attributes["slipway.stream"] is stream
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["slipway.request_id"] == r.headers["x-request-id"]
    assert root.attributes["gen_ai.usage.output_tokens"] == 2
    assert root.status != ERROR
    steps = children(spans, root)
    assert set(steps) == {"gateway.auth", "gateway.admission", "gateway.upstream"}
    auth, admission, attempt = (
        steps["gateway.auth"],
        steps["gateway.admission"],
        steps["gateway.upstream"],
    )
    assert auth.end_ns <= admission.start_ns and admission.end_ns <= attempt.start_ns
    assert admission.attributes["slipway.tenant"] == "alice"
    assert attempt.kind == CLIENT
    assert attempt.attributes["slipway.attempt"] == 1
    assert attempt.attributes["slipway.version"] == "1"
    assert attempt.attributes["slipway.replica"] == url
    assert attempt.attributes["http.response.status_code"] == 200
    relay = children(spans, attempt)
    assert set(relay) == {"gateway.relay"}
    assert all(within(s, root) for s in (auth, admission, attempt))
    assert within(relay["gateway.relay"], attempt)
    assert len(spans) == 5
    # The backend's request carried the attempt span's context: vLLM's spans become its children.
    (sent,) = upstream_headers(upstream)
    assert sent["traceparent"].startswith(f"00-{root.trace_id}-{attempt.span_id}-")
    assert sampled(sent["traceparent"])
    assert "authorization" not in sent
    # No secret and no prompt in any attribute: not the key, not its hash, not the prompt.
    for span in spans:
        for value in [*span.attributes.values(), *span.resource.values()]:
            for secret in (key, key_hash(key), "secret prompt words"):
                assert secret not in str(value), (span.name, value)
    assert root.resource["service.name"] == SERVICE
    frame = read_usage(start, time.time() + 1)
    assert list(frame.trace_id) == [root.trace_id]


def test_a_clients_traceparent_is_continued_and_its_sampling_followed(
    mock, keys, run_gateway, otlp
):
    upstream, url = mock
    start = time.time()
    config = keys.config([backend(url, "1")], **traced(otlp))
    auth = {"Authorization": f"Bearer {keys.key('alice')}"}
    unsampled = "11111111111111111111111111111111"
    with run_gateway(config) as base:
        for parent in (
            f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",  # sampled: continued
            f"00-{unsampled}-{CLIENT_SPAN}-00",  # not sampled by the client: nor by the gateway
            "00-not-a-trace-context-01",  # malformed: ignored, a new trace
        ):
            headers = {**auth, "traceparent": parent, "tracestate": "vendor=abc"}
            r = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
            assert r.status_code == 200
    spans = otlp.of(SERVICE)
    roots = {s.trace_id: s for s in spans if s.name == ROOT}
    assert len(roots) == 2 and unsampled not in roots  # the unsampled request made no spans
    continued = roots[CLIENT_TRACE]
    assert continued.parent_id == CLIENT_SPAN
    (fresh,) = (s for t, s in roots.items() if t != CLIENT_TRACE)
    assert fresh.parent_id == ""
    sent = upstream_headers(upstream)
    attempt = children(spans, continued)["gateway.upstream"]
    assert sent[0]["traceparent"].startswith(f"00-{CLIENT_TRACE}-{attempt.span_id}-")
    assert sampled(sent[0]["traceparent"])
    assert sent[0]["tracestate"] == "vendor=abc"  # the client's vendor state goes on with it
    # The unsampled trace still reaches the backend, unsampled, so it records nothing either.
    assert sent[1]["traceparent"].startswith(f"00-{unsampled}-")
    assert not sampled(sent[1]["traceparent"])
    assert sent[2]["traceparent"].startswith(f"00-{fresh.trace_id}-")
    frame = read_usage(start, time.time() + 1)
    assert frame.trace_id.tolist() == [CLIENT_TRACE, None, fresh.trace_id]


def test_a_retried_request_has_one_upstream_span_per_try(mock, keys, run_gateway, otlp):
    upstream, url = mock
    upstream.faults["served-2"] = Fault(status=500, times=1)
    config = keys.config(
        [backend(url, "1", weight=0), backend(url, "2", role="canary", weight=100)],
        **traced(otlp),
    )
    with run_gateway(config) as base:
        headers = {"Authorization": f"Bearer {keys.key('alice')}"}
        r = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 200 and r.headers["x-slipway-backend"].startswith("1")
    spans = otlp.of(SERVICE)
    root = only_root(spans)
    assert root.attributes["slipway.version"] == "1" and root.status != ERROR
    tries = sorted(
        (s for s in spans if s.name == "gateway.upstream"),
        key=lambda s: s.attributes["slipway.attempt"],
    )
    assert [s.parent_id for s in tries] == [root.span_id] * 2
    first, second = tries
    assert first.attributes["slipway.version"] == "2"
    assert first.attributes["slipway.role"] == "canary"
    assert first.status == ERROR and first.attributes["error.type"] == "upstream_error"
    assert first.attributes["http.response.status_code"] == 500
    assert second.attributes["slipway.version"] == "1" and second.status != ERROR
    assert first.end_ns <= second.start_ns
    # Each try told its backend its own span.
    sent = [h["traceparent"] for h in upstream_headers(upstream)]
    assert [p.rsplit("-", 1)[0] for p in sent] == [f"00-{root.trace_id}-{s.span_id}" for s in tries]
    assert all(sampled(p) for p in sent)


def test_a_refused_request_ends_in_the_step_that_refused_it(mock, keys, run_gateway, otlp):
    upstream, url = mock
    wrong = "sk-wrong-" + "x" * 20
    config = keys.config([backend(url, "1")], [keys.tenant("alice", rpm=1)], **traced(otlp))
    with run_gateway(config) as base:
        for key in (wrong, keys.key("alice"), keys.key("alice")):  # 401, 200, 429
            headers = {"Authorization": f"Bearer {key}"}
            httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
    spans = otlp.of(SERVICE)
    roots = {s.attributes["http.response.status_code"]: s for s in spans if s.name == ROOT}
    assert set(roots) == {401, 200, 429}
    unknown = roots[401]
    assert "slipway.tenant" not in unknown.attributes
    assert unknown.attributes["error.type"] == "invalid_api_key"
    steps = children(spans, unknown)
    assert set(steps) == {"gateway.auth"}
    assert steps["gateway.auth"].status == ERROR
    assert steps["gateway.auth"].attributes["error.type"] == "invalid_api_key"
    limited = roots[429]
    assert limited.attributes["slipway.tenant"] == "alice"
    assert limited.attributes["error.type"] == "rate_limit_exceeded"
    steps = children(spans, limited)
    assert set(steps) == {"gateway.auth", "gateway.admission"}  # never sent upstream
    assert steps["gateway.admission"].status == ERROR
    assert steps["gateway.admission"].attributes["error.type"] == "rate_limit_exceeded"
    assert len(upstream.requests) == 1
    for span in spans:
        assert not any(wrong in str(v) for v in span.attributes.values()), span.name


def test_a_request_that_waits_for_a_slot_has_a_queue_span(mock, keys, run_gateway, otlp):
    upstream, url = mock
    upstream.delay_s = 0.3
    config = keys.config(
        [backend(url, "1", max_concurrency=1)], queue={"max_waiting": 4}, **traced(otlp)
    )
    with run_gateway(config) as base:
        answers = asyncio.run(post_many(base, keys.key("alice"), [chat(), chat()]))
        assert [status for status, _, _ in answers] == [200, 200]
    spans = otlp.of(SERVICE)
    queued = [s for s in spans if s.name == "gateway.queue"]
    assert len(queued) == 1  # the first request found the slot free
    (wait,) = queued
    root = next(s for s in spans if s.span_id == wait.parent_id)
    assert root.name == ROOT
    attempt = children(spans, root)["gateway.upstream"]
    assert wait.end_ns <= attempt.start_ns
    assert (wait.end_ns - wait.start_ns) / 1e9 > 0.2  # it waited for the other's answer


def test_no_spans_with_a_sample_ratio_of_0_but_the_context_still_goes_on(
    mock, keys, run_gateway, otlp
):
    upstream, url = mock
    start = time.time()
    config = keys.config([backend(url, "1")], **traced(otlp, sample_ratio=0.0))
    with run_gateway(config) as base:
        headers = {"Authorization": f"Bearer {keys.key('alice')}"}
        assert httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers).is_success
    assert otlp.of(SERVICE) == []
    (sent,) = upstream_headers(upstream)
    assert not sampled(sent["traceparent"])  # the backend is told not to record it either
    assert read_usage(start, time.time() + 1).trace_id.tolist() == [None]


@pytest.fixture
def made_spans(monkeypatch) -> list[str]:
    """The names of the spans the OpenTelemetry SDK makes from now on, recording or not."""
    made: list[str] = []
    recording, non_recording = _Span.__init__, NonRecordingSpan.__init__

    def recorded(self, name, *args, **kwargs):
        made.append(name)
        recording(self, name, *args, **kwargs)

    def not_recorded(self, *args, **kwargs):
        made.append("(not recording)")
        non_recording(self, *args, **kwargs)

    monkeypatch.setattr(_Span, "__init__", recorded)
    monkeypatch.setattr(NonRecordingSpan, "__init__", not_recorded)
    return made


def test_with_tracing_off_no_span_is_made_and_no_traceparent_sent(
    mock, keys, run_gateway, otlp, made_spans
):
    upstream, url = mock
    start = time.time()
    headers = {
        "Authorization": f"Bearer {keys.key('alice')}",
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
    }
    config = keys.config([backend(url, "1")])
    assert config.tracing.endpoint is None  # off unless configured
    with run_gateway(config) as base:
        for stream in (False, True):
            r = httpx.post(f"{base}/v1/chat/completions", json=chat(stream=stream), headers=headers)
            assert r.status_code == 200
    assert made_spans == []
    assert otlp.posts == []
    sent = upstream_headers(upstream)
    assert len(sent) == 2
    assert not any("traceparent" in h or "tracestate" in h for h in sent)  # not even the client's
    assert read_usage(start, time.time() + 1).trace_id.isna().all()
    # The same requests with tracing on: the count above would have seen their spans.
    with run_gateway(keys.config([backend(url, "1")], **traced(otlp))) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 200
    # (the client's parent, as read from its traceparent, is a span that records nothing)
    assert made_spans.count("(not recording)") == 1
    made = sorted(name for name in made_spans if name != "(not recording)")
    assert made == sorted(s.name for s in otlp.of(SERVICE)) and len(made) == 5


OLD_USAGE = Table(USAGE.name, tuple(c for c in USAGE.columns if c[0] != "trace_id"))


def test_the_trace_id_is_in_the_usage_row_in_sqlite_and_postgresql(
    mock, keys, run_gateway, otlp, home, pg_url
):
    """Both sinks; each log was written by a release without the column, which it gains."""
    _, url = mock
    start = time.time()
    old_row = (start, "old", None, None, "chat", None, None, False, 200, None, 1, 2, None, 3.0)
    old_row += (None, None, 1, None)
    path = home.logs / "gateway-usage.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        for statement in OLD_USAGE.ddl("sqlite"):
            db.execute(statement)
        db.execute(
            f"INSERT INTO {USAGE.name} ({', '.join(OLD_USAGE.names)}) VALUES "
            f"({', '.join('?' * len(old_row))})",
            old_row,
        )
    pg = psycopg2.connect(pg_url)
    with pg, pg.cursor() as cursor:
        for statement in OLD_USAGE.ddl("postgresql"):
            cursor.execute(statement)
        cursor.execute(
            f"INSERT INTO {USAGE.name} ({', '.join(OLD_USAGE.names)}) VALUES "
            f"(to_timestamp(%s), {', '.join(['%s'] * (len(old_row) - 1))})",
            old_row,
        )
    pg.close()
    for usage in ({}, {"url": pg_url}):
        config = keys.config([backend(url, "1")], usage=usage, **traced(otlp))
        with run_gateway(config) as base:
            headers = {"Authorization": f"Bearer {keys.key('alice')}"}
            r = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
        frame = read_usage(start - 1, time.time() + 1, url=usage.get("url"))
        assert frame.request_id.tolist() == ["old", r.headers["x-request-id"]]
        assert frame.trace_id.iloc[0] is None
        (root,) = (
            s
            for s in otlp.of(SERVICE)
            if s.name == ROOT and s.attributes["slipway.request_id"] == r.headers["x-request-id"]
        )
        assert frame.trace_id.iloc[1] == root.trace_id and len(root.trace_id) == 32


def test_the_tracing_section_is_typed_and_off_by_default(keys):
    assert TracingSpec().endpoint is None
    spec = TracingSpec(endpoint="http://collector:4318/v1/traces", sample_ratio=0.25)
    assert spec.service_name == "slipway-gateway" and spec.sample_ratio == 0.25
    for wrong in (
        {"endpoint": "collector:4318"},
        {"endpoint": "http://c/v1/traces", "sample_ratio": 1.5},
        {"endpoint": "http://c/v1/traces", "sample_ratio": -0.1},
        {"endpoint": "http://c/v1/traces", "service_name": ""},
        {"endpoint": "http://c/v1/traces", "exporter": "zipkin"},
    ):
        with pytest.raises(ValidationError):
            TracingSpec(**wrong)
    with pytest.raises(ValidationError):
        GatewayConfig.model_validate(
            {"admin_token_sha256": key_hash("x"), "tracing": {"endpoint": "nope"}}
        )


@pytest.mark.stress
def test_the_gateways_and_vllms_spans_share_a_trace(tiny_model_source, home, otlp, monkeypatch):
    """Real vLLM on the tiny model, exporting its spans to the same receiver over OTLP/HTTP:
    each request's `llm_request` span (vLLM's) is the child of the gateway's upstream span."""
    from configs.models import Serving
    from serving.vllm import VLLMServer
    from tests.evaluation.conftest import KEY, gateway_to

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")  # vLLM: gRPC else
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # ms: its spans are sent soon after
    serving = Serving(engine_args=["--max-model-len", "256", "--otlp-traces-endpoint", otlp.url])
    with VLLMServer(tiny_model_source, "tiny", home, serving) as engine:
        with gateway_to(engine.url, "tiny", "tiny-chat", home, **traced(otlp)) as base:
            for stream in (False, True):
                body = {**chat(stream=stream), "max_tokens": 4, "ignore_eos": True}
                r = httpx.post(
                    f"{base}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=120,
                )
                assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while len([s for s in otlp.spans if s.name == "llm_request"]) < 2:
            assert time.monotonic() < deadline, "vLLM exported no llm_request spans in 30 s"
            time.sleep(0.2)
    gateway = otlp.of(SERVICE)
    engine_spans = [s for s in otlp.spans if s.name == "llm_request"]
    attempts = {s.span_id: s for s in gateway if s.name == "gateway.upstream"}
    roots = {s.trace_id: s for s in gateway if s.name == ROOT}
    assert len(roots) == 2 and len(engine_spans) == 2
    for span in engine_spans:
        assert span.service != SERVICE and span.kind == SERVER
        assert span.trace_id in roots  # one trace: the gateway's
        assert span.parent_id in attempts  # under the try that sent it
        assert attempts[span.parent_id].trace_id == span.trace_id
        assert span.attributes["gen_ai.usage.completion_tokens"] == 4
