"""A fast fake OpenAI-compatible server (raw ASGI) for the gateway tests and benchmark.

It answers /v1/chat/completions and /v1/completions (streaming or not, usage, echo + logprobs as
lm-eval's local-completions reads them) with the requested model name echoed back, so a test sees
which backend answered. Streams honour stream_options as vLLM does: include_usage adds a final
usage-only event, continuous_usage_stats (with it) puts the cumulative usage in every chunk; a
client that goes away stops the generation, and `generated` records the tokens each stream made;
GET /metrics shows the prompt and generated tokens served in all as vLLM's counters; `requests` and
`headers` record each POST's body and headers.
Faults are injected per served model name: an error status, latency, a stream that breaks off, a
server that never answers, one that ignores stream_options (sends no usage), other answers.

    slipway bench mock-upstream --port 9000           # for the benchmark
    with serve(MockUpstream()) as url: ...             # in a test: a uvicorn thread on a free port
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from serving.processes import free_port


@dataclass
class Fault:
    status: int | None = None  # answer this status instead
    delay_s: float = 0.0  # wait before answering
    break_after: int | None = None  # streams: abort the connection after this many chunks
    no_usage: bool = False  # streams: ignore stream_options, as some OpenAI-compatible servers do
    word: str = "w"  # answers are word0 word1 ...: another word stands for a different answer
    times: int = -1  # how many requests it applies to; -1: all
    every: int = 1  # the status applies to one request in `every` (others answer normally)
    seen: int = 0


class MockUpstream:
    def __init__(self, chunks: int = 4, chunk_delay_s: float = 0.0, delay_s: float = 0.0) -> None:
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.delay_s = delay_s  # service time before every answer, unless a fault sets its own
        self.faults: dict[str, Fault] = {}
        self.unhealthy = 0  # /health answers 503 to this many checks
        self.requests: deque[dict] = deque(maxlen=10_000)
        # each recorded request's headers as received (ASGI pairs), in the order of `requests`
        self.headers: deque[list[tuple[bytes, bytes]]] = deque(maxlen=10_000)
        self.generated: deque[int] = deque(maxlen=10_000)  # completion tokens, per stream, in order
        self.record = True
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.waiting = 0  # what /metrics reports as vllm:num_requests_waiting

    def _fault(self, model: str) -> Fault | None:
        fault = self.faults.get(model)
        if fault is None or fault.times == 0:
            return None
        if fault.times > 0:
            fault.times -= 1
        return fault

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        path = scope["path"]
        if scope["method"] == "GET" and path == "/metrics":
            return await _text(send, self.metrics())
        if scope["method"] == "GET" and path == "/health" and self.unhealthy > 0:
            self.unhealthy -= 1
            return await _json(send, 503, {})
        if scope["method"] == "GET":
            body = (
                {"object": "list", "data": [{"id": "mock", "object": "model"}]}
                if path == "/v1/models"
                else {}
            )
            return await _json(send, 200, body)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        request = json.loads(b"".join(chunks))
        if self.record:
            self.requests.append(request)
            self.headers.append(scope["headers"])
        model = request.get("model", "")
        fault = self._fault(model)
        delay = fault.delay_s if fault and fault.delay_s else self.delay_s
        if delay:
            await asyncio.sleep(delay)
        if fault and fault.status and (fault.every == 1 or next_seen(fault) % fault.every == 0):
            error = {
                "error": {
                    "message": f"injected {fault.status}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
            return await _json(send, fault.status, error)
        if path in _OTHER:
            return await getattr(self, _OTHER[path])(send, receive, request, model, fault)
        chat = path.endswith("/chat/completions")
        try:
            n, prompts = _read(request, chat, self.chunks)
        except (TypeError, ValueError) as e:  # as vLLM does: a request it cannot serve is a 400
            error = {
                "error": {"message": str(e), "type": "BadRequestError", "param": None, "code": 400}
            }
            return await _json(send, 400, error)
        usage = {
            "prompt_tokens": sum(len(p) for p in prompts),
            "completion_tokens": n * len(prompts),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.prompt_tokens_total += usage["prompt_tokens"]
        if request.get("stream"):
            return await self._stream(send, receive, request, model, chat, n, usage, fault)
        word = fault.word if fault else "w"
        words = [f"{word}{i}" for i in range(n)]
        if chat:
            choices = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words)},
                    "finish_reason": "length",
                }
            ]
        else:
            choices = [_completion_choice(i, p, words, request) for i, p in enumerate(prompts)]
        body = {
            "id": "cmpl-mock",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage,
        }
        self.generation_tokens_total += usage["completion_tokens"]
        await _json(send, 200, body)

    async def _tokenize(self, send, receive, request, model, fault) -> None:
        [words] = _prompts(request, "messages" in request)
        body = {"count": len(words), "max_model_len": MAX_TOKENS, "tokens": list(range(len(words)))}
        await _json(send, 200, body)

    async def _detokenize(self, send, receive, request, model, fault) -> None:
        await _json(send, 200, {"prompt": " ".join(f"t{t}" for t in request["tokens"])})

    async def _embeddings(self, send, receive, request, model, fault) -> None:
        given = request.get("input", "")
        inputs = [given] if isinstance(given, str) or isinstance(given[0], int) else given
        tokens = sum(len(i.split()) if isinstance(i, str) else len(i) for i in inputs)
        self.prompt_tokens_total += tokens
        data = [
            {"object": "embedding", "index": i, "embedding": [0.5, -0.5]}
            for i in range(len(inputs))
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        await _json(send, 200, {"object": "list", "model": model, "data": data, "usage": usage})

    async def _responses(self, send, receive, request, model, fault) -> None:
        """A Responses API answer: words w0 w1 ..., usage only on the whole response, which a
        stream sends in its last event (response.completed), as vLLM does."""
        given = request.get("input", "")
        items = [given] if isinstance(given, str) else given
        prompt = sum(
            len(str(i.get("content", "") if isinstance(i, dict) else i).split()) for i in items
        )
        n = request.get("max_output_tokens") or self.chunks
        self.prompt_tokens_total += prompt
        word = fault.word if fault else "w"

        def response(sent: int, status: str) -> dict:
            text = " ".join(f"{word}{i}" for i in range(sent))
            usage = {"input_tokens": prompt, "output_tokens": sent, "total_tokens": prompt + sent}
            return {
                "id": "resp_mock",
                "object": "response",
                "model": model,
                "status": status,
                "output": [
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text}],
                    }
                ],
                "usage": usage if status != "in_progress" else None,
            }

        if not request.get("stream"):
            self.generation_tokens_total += n
            return await _json(send, 200, response(n, "completed"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        async def event(kind: str, data: dict) -> None:
            compact = json.dumps({**data, "type": kind}, separators=(",", ":"))
            body = f"event: {kind}\ndata: {compact}\n\n"
            await send({"type": "http.response.body", "body": body.encode(), "more_body": True})

        await event("response.created", {"response": response(0, "in_progress")})
        gone, sent = asyncio.ensure_future(receive()), 0
        try:
            while sent < n and not gone.done():
                await event(
                    "response.output_text.delta", {"delta": f"{word}{sent} ", "output_index": 0}
                )
                sent += 1
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
        finally:
            gone.cancel()
            self._generated(sent)
        await event("response.completed", {"response": response(sent, "completed")})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _generated(self, tokens: int) -> None:
        """A stream ended (or was cut off) after `tokens`: counted as vLLM counts them."""
        self.generation_tokens_total += tokens
        if self.record:
            self.generated.append(tokens)

    def metrics(self) -> str:
        return (
            f'vllm:prompt_tokens_total{{model_name="mock"}} {self.prompt_tokens_total}.0\n'
            f'vllm:generation_tokens_total{{model_name="mock"}} '
            f"{self.generation_tokens_total}.0\n"
            f'vllm:num_requests_waiting{{model_name="mock"}} {self.waiting}.0\n'
        )

    async def _stream(self, send, receive, request, model, chat, n, usage, fault) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        options = {} if fault and fault.no_usage else request.get("stream_options") or {}
        include = bool(options.get("include_usage"))
        continuous = include and bool(options.get("continuous_usage_stats"))
        prompt_tokens = usage["prompt_tokens"]
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = (
            f'data: {{"id":"cmpl-mock","object":"{kind}","created":{int(time.time())},'
            f'"model":"{model}","choices":['
        )
        gone = asyncio.ensure_future(receive())  # the body is read: the next message is the end
        word = fault.word if fault else "w"
        sent = 0
        try:
            while sent < n and not gone.done():  # a client gone stops the generation, as in vLLM
                if fault and fault.break_after is not None and sent >= fault.break_after:
                    raise ConnectionAbortedError("injected: stream broken")
                choice = (
                    f'{{"index":0,"delta":{{"content":"{word}{sent} "}},"finish_reason":null}}'
                    if chat
                    else f'{{"index":0,"text":"{word}{sent} ","finish_reason":null}}'
                )
                sent += 1
                tail = (
                    f',"usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":{sent},'
                    f'"total_tokens":{prompt_tokens + sent}}}}}'
                    if continuous
                    else "}"
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"{head}{choice}]{tail}\n\n".encode(),
                        "more_body": True,
                    }
                )
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
        finally:
            gone.cancel()
            self._generated(sent)
        if include:
            tail = f'{head}],"usage":{json.dumps(usage, separators=(",", ":"))}}}\n\n'
            await send({"type": "http.response.body", "body": tail.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _text(send, body: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; version=0.0.4")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


_OTHER = {
    "/tokenize": "_tokenize",
    "/detokenize": "_detokenize",
    "/v1/embeddings": "_embeddings",
    "/v1/responses": "_responses",
}


def next_seen(fault: Fault) -> int:
    fault.seen += 1
    return fault.seen


MAX_TOKENS = 4096  # the mock's "max_model_len"


def _read(request: dict, chat: bool, default: int) -> tuple[int, list[list]]:
    """Tokens to generate and the prompts; ValueError/TypeError for what vLLM would refuse."""
    n = request.get("max_tokens") or default
    if not isinstance(n, int) or not 0 <= n <= MAX_TOKENS:
        raise ValueError(f"max_tokens must be an integer from 0 to {MAX_TOKENS}")
    return n, _prompts(request, chat)


def _prompts(request: dict, chat: bool) -> list[list]:
    """Each prompt as a list of 'tokens' (words, or the token ids given)."""
    if chat:
        return [" ".join(str(m.get("content", "")) for m in request.get("messages", [])).split()]
    prompt = request.get("prompt", "")
    if isinstance(prompt, str):
        return [prompt.split()]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    return [p.split() if isinstance(p, str) else list(p) for p in prompt]


def _completion_choice(index: int, prompt: list, words: list[str], request: dict) -> dict:
    echo = bool(request.get("echo"))
    tokens = ([str(t) for t in prompt] if echo else []) + words
    choice = {"index": index, "text": " ".join(tokens), "finish_reason": "length", "logprobs": None}
    if request.get("logprobs") is not None:
        lps = [None if (echo and i == 0) else -0.5 for i in range(len(tokens))]
        choice["logprobs"] = {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": [
                None if lp is None else {t: lp} for t, lp in zip(tokens, lps, strict=True)
            ],
            "text_offset": list(range(len(tokens))),
        }
    return choice


async def _json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


@contextmanager
def serve(app, port: int | None = None, **config) -> Iterator[str]:
    """Run an ASGI app on uvicorn in a thread (its own event loop); yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            loop="asyncio",
            http="httptools",
            lifespan="on",
            **config,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def run(port: int, chunks: int, delay_s: float, chunk_delay_s: float) -> None:
    """Serve the mock on 127.0.0.1:PORT (uvloop + httptools)."""
    upstream = MockUpstream(chunks=chunks, chunk_delay_s=chunk_delay_s, delay_s=delay_s)
    uvicorn.run(
        upstream,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
