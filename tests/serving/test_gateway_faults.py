"""Faults and overload against real processes: the gateway (`slipway gateway`) and mock
upstreams each run as their own process, so a backend can be killed with SIGKILL and the gateway's
memory read from outside.

- A replica killed under load (make test): plain requests are retried on its sibling, its circuit
  opens, the version keeps serving.
- A canary killed under load (make test): non-streaming requests are retried on stable, streams
  the canary had started end with an error event, the circuit opens. A killed stable backend on
  a route with failover: every non-streaming request is served, by the canary once stable is gone.
  SIGTERM: a stream in flight finishes, new connections are refused, the usage log is flushed.
- Overload at 10x a known capacity (backend max_concurrency / upstream service time) for a
  minute (make stress): admitted requests keep their latency, the rest get 429/503 with
  Retry-After, memory stays bounded, nothing crashes, and SIGTERM afterwards loses no usage record.
Bad requests, oversize bodies, timeouts and broken streams one at a time are in
test_gateway_resilience.py; canary retries and the breaker with injected 5xx in
test_gateway_routing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import psutil
import pytest

from configs.home import REPO
from serving.gateway.auth import key_hash
from serving.gateway.usage import read_usage
from serving.processes import free_port
from tests.serving.conftest import MODEL, SIGNER, backend, chat


@contextmanager
def process(args: list[str], log: Path, health: str) -> Iterator[subprocess.Popen]:
    """A Python module of this repo as a process, answering `health`; SIGTERM (then SIGKILL)
    after."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (
                f"{args[0]} exited with {proc.returncode}: {log.read_text()[-2000:]}"
            )
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{health} did not answer in 60 s"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def upstream(tmp_path: Path, name: str, **options: float) -> tuple[str, list[str], Path]:
    port = free_port()
    args = [
        "flows.cli",
        "bench",
        "mock-upstream",
        "--port",
        str(port),
        *[f"--{k.replace('_', '-')}={v}" for k, v in options.items()],
    ]
    return f"http://127.0.0.1:{port}", args, tmp_path / f"{name}.log"


@dataclass
class Gateway:
    url: str
    key: str
    admin: str
    usage: str


@contextmanager
def gateway(
    tmp_path: Path, backends: list[dict], tenants: tuple[dict, ...] = (), **fields
) -> Iterator[tuple[Gateway, subprocess.Popen]]:
    """The gateway process with one route and tenant alice (no limits), plus `tenants`."""
    key, admin = "sk-test-" + secrets.token_urlsafe(24), "adm-" + secrets.token_urlsafe(24)
    usage = f"sqlite:///{tmp_path / 'usage.sqlite'}"
    config = {
        "admin_token_sha256": key_hash(admin),
        "routes": [{"model": MODEL, "backends": backends}],
        "tenants": [{"name": "alice", "key_sha256": key_hash(key)}, *tenants],
        "usage": {"url": usage},
        "state": {"url": f"sqlite:///{tmp_path / 'state.sqlite'}"},  # a store of this test's own
        "trust": SIGNER.trust(),
        **fields,
    }
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    port = free_port()
    args = [
        "flows.cli",
        "gateway",
        "--config",
        str(path),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with process(args, tmp_path / "gateway.log", f"http://127.0.0.1:{port}/health") as proc:
        yield Gateway(f"http://127.0.0.1:{port}", key, admin, usage), proc


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes
    started: float  # monotonic
    seconds: float
    stream: bool

    @property
    def events(self) -> list[str]:
        return [line for line in self.body.decode().splitlines() if line.startswith("data: ")]


async def call(
    session: aiohttp.ClientSession, gw: Gateway, body: dict, tenant_key: str | None = None
) -> Answer:
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {tenant_key or gw.key}"}
    async with session.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers) as r:
        data = await r.read()
        return Answer(
            r.status,
            dict(r.headers),
            data,
            started,
            time.monotonic() - started,
            bool(body.get("stream")),
        )


def stats(gw: Gateway) -> dict[str, dict]:
    r = httpx.get(f"{gw.url}/admin/stats/{MODEL}", headers={"Authorization": f"Bearer {gw.admin}"})
    return {b["version"]: b for b in r.json()["backends"]}


# ---- a backend killed under load -----------------------------------------------------------------


async def closed_loop(
    gw: Gateway, workers: int, seconds: float, kill_at: float, victim: subprocess.Popen
) -> tuple[list[Answer], float]:
    """`workers` clients, each alternating a plain and a streamed request; SIGKILL `victim` at
    kill_at."""
    answers: list[Answer] = []
    start = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(i: int) -> None:
            n = i
            while time.monotonic() - start < seconds:
                stream = n % 2 == 1
                body = chat(max_tokens=30, stream=True) if stream else chat()
                answers.append(await call(session, gw, body))
                n += 1

        async def killer() -> float:
            await asyncio.sleep(kill_at)
            victim.kill()  # SIGKILL: no goodbye, connections just drop
            return time.monotonic()

        *_, killed = await asyncio.gather(*(worker(i) for i in range(workers)), killer())
    return answers, killed


def kill_under_load(
    tmp_path: Path, victim: str, failover: bool = False
) -> tuple[list[Answer], float, dict, int]:
    """Stable "1" and canary "2" at 50/50, 16 clients for 8 s, `victim` SIGKILLed after 3 s.
    Returns the answers, when the kill happened, the admin stats and /ready's status after."""
    urls, procs = {}, {}
    with contextlib.ExitStack() as stack:
        for role in ("stable", "canary"):
            urls[role], args, log = upstream(tmp_path, role, delay_s=0.05, chunk_delay_s=0.05)
            procs[role] = stack.enter_context(process(args, log, urls[role] + "/health"))
        backends = [
            backend(urls["stable"], "1", weight=50),
            backend(urls["canary"], "2", role="canary", weight=50),
        ]
        route = {"model": MODEL, "backends": backends, "failover": failover}
        gw, _ = stack.enter_context(
            gateway(tmp_path, backends, breaker={"failures": 3, "open_s": 600}, routes=[route])
        )
        answers, killed = asyncio.run(
            closed_loop(gw, workers=16, seconds=8, kill_at=3, victim=procs[victim])
        )
        return answers, killed, stats(gw), httpx.get(f"{gw.url}/ready").status_code


def test_canary_killed_under_load(tmp_path):
    answers, killed, after, ready = kill_under_load(tmp_path, "canary")

    plain = [a for a in answers if not a.stream]
    streams = [a for a in answers if a.stream]
    assert all(a.status == 200 for a in plain), [a.body[:200] for a in plain if a.status != 200]
    assert all(a.status == 200 for a in streams)
    broken = [a for a in streams if a.events[-1] != "data: [DONE]"]
    for a in broken:  # a stream the canary had started ends with an OpenAI-shaped error event
        error = json.loads(a.events[-1].removeprefix("data: "))["error"]
        assert error["code"] == "upstream_stream_broken" and a.headers["x-slipway-backend"] == "2"
    assert broken, "no stream was in flight on the canary when it was killed"
    assert any(a.headers["x-slipway-backend"] == "2" for a in plain if a.started < killed)
    late = [a for a in answers if a.started > killed + 0.5]
    assert late and all(a.headers["x-slipway-backend"] == "1" for a in late)  # retried on stable
    assert after["2"]["circuit"] == "open" and after["1"]["circuit"] == "closed"
    assert ready == 200  # the stable backend still serves the model
    print(
        f"\n{len(plain)} plain requests, all 200; {len(streams)} streams, "
        f"{len(broken)} broken off by the kill"
    )


def test_stable_killed_under_load_fails_over_to_the_canary(tmp_path):
    answers, killed, after, ready = kill_under_load(tmp_path, "stable", failover=True)

    plain = [a for a in answers if not a.stream]
    failed = [(a.status, a.body[:120]) for a in plain if a.status != 200]
    assert not failed, f"{len(failed)} of {len(plain)} plain requests failed, e.g. {failed[:3]}"
    late = [a for a in answers if a.started > killed + 0.5]
    assert late and all(a.status == 200 and a.headers["x-slipway-backend"] == "2" for a in late)
    assert after["1"]["circuit"] == "open" and after["2"]["circuit"] == "closed"
    assert after["2"]["failover"]["requests"] > 0  # counted apart from the canary's evidence
    assert ready == 503  # no stable backend: not ready, though the model is still served


def test_a_replica_killed_under_load_fails_no_plain_request(tmp_path):
    """Version "1" on two replicas, 16 clients for 8 s, one replica SIGKILLed after 3 s: plain
    requests it had are retried on its sibling; only streams it had begun break."""
    urls, procs = [], []
    with contextlib.ExitStack() as stack:
        for name in ("replica-a", "replica-b"):
            url, args, log = upstream(tmp_path, name, delay_s=0.05, chunk_delay_s=0.05)
            procs.append(stack.enter_context(process(args, log, url + "/health")))
            urls.append(url)
        backends = [backend(urls[0], "1", replicas=[urls[1]])]
        gw, _ = stack.enter_context(
            gateway(tmp_path, backends, breaker={"failures": 3, "open_s": 600})
        )
        answers, killed = asyncio.run(
            closed_loop(gw, workers=16, seconds=8, kill_at=3, victim=procs[0])
        )
        after = stats(gw)["1"]
    plain = [a for a in answers if not a.stream]
    failed = [(a.status, a.body[:120]) for a in plain if a.status != 200]
    assert not failed, f"{len(failed)} of {len(plain)} plain requests failed, e.g. {failed[:3]}"
    broken = [a for a in answers if a.stream and a.events[-1] != "data: [DONE]"]
    assert broken and all(a.started < killed for a in broken)  # only those it had begun
    late = [a for a in answers if a.started > killed + 0.5]
    assert late and all(a.status == 200 for a in late)
    assert all(a.events[-1] == "data: [DONE]" for a in late if a.stream)
    circuits = {r["url"]: r["circuit"] for r in after["replicas"]}
    assert circuits == {urls[0]: "open", urls[1]: "closed"} and after["circuit"] == "closed"
    print(f"\n{len(plain)} plain requests, all 200; {len(broken)} streams broken off by the kill")


def test_sigterm_drains_a_stream_in_flight_and_refuses_new_connections(tmp_path):
    url, args, log = upstream(tmp_path, "stable", chunk_delay_s=0.02)
    with (
        process(args, log, url + "/health"),
        gateway(tmp_path, [backend(url, "1")]) as (gw, proc),
    ):
        auth = {"Authorization": f"Bearer {gw.key}"}
        body = chat(max_tokens=100, stream=True)  # 2 s of tokens
        post = f"{gw.url}/v1/chat/completions"
        with httpx.stream("POST", post, json=body, headers=auth, timeout=30) as r:
            lines = r.iter_lines()  # held: a generator dropped closes the response
            head = [next(lines) for _ in range(4)]
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while True:  # the listener closes once the server has taken the signal
                try:
                    httpx.get(f"{gw.url}/health", timeout=1)
                except httpx.ConnectError:
                    break
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.05)
            events = [line for line in [*head, *lines] if line.startswith("data: ")]
        assert proc.wait(15) == -signal.SIGTERM  # uvicorn ends by re-raising the signal it took
    assert len(events) == 101 and events[-1] == "data: [DONE]"  # every token, then the end
    [row] = read_usage(0, time.time() + 1, url=gw.usage).itertuples()  # flushed on the way out
    assert (row.status, row.completion_tokens, row.error_kind) == (200, 100, None)


# ---- overload ------------------------------------------------------------------------------------

SERVICE_S = 0.5  # the upstream's fixed service time
CONCURRENCY = 10  # the backend's max_concurrency: capacity = 10 / 0.5 s = 20 requests/s
CAPACITY = CONCURRENCY / SERVICE_S


async def open_loop(gw: Gateway, rate: float, seconds: float, limited_key: str) -> list[Answer]:
    """Arrivals at a fixed rate whatever the answers (open loop); every 10th from a rate-limited
    tenant."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        loop = asyncio.get_running_loop()
        t0, pending = loop.time(), []
        for i in range(int(rate * seconds)):
            if (wait := t0 + i / rate - loop.time()) > 0:
                await asyncio.sleep(wait)
            body = chat(stream=True, max_tokens=3) if i % 5 == 0 else chat()
            pending.append(
                asyncio.ensure_future(call(session, gw, body, limited_key if i % 10 == 3 else None))
            )
        return await asyncio.gather(*pending)


def rss_sampler(pid: int, every_s: float = 0.5) -> tuple[list[int], threading.Event]:
    samples: list[int] = []
    stop = threading.Event()

    def run() -> None:
        proc = psutil.Process(pid)
        while not stop.wait(every_s):
            samples.append(proc.memory_info().rss)

    threading.Thread(target=run, daemon=True).start()
    return samples, stop


@pytest.mark.stress
def test_ten_times_capacity_for_a_minute(tmp_path):
    seconds = 60
    url, args, log = upstream(tmp_path, "upstream", delay_s=SERVICE_S)
    limited = "sk-test-" + secrets.token_urlsafe(24)
    tenants = ({"name": "limited", "key_sha256": key_hash(limited), "rpm": 300},)
    with (
        process(args, log, url + "/health"),
        gateway(tmp_path, [backend(url, "1", max_concurrency=CONCURRENCY)], tenants) as (gw, proc),
    ):
        rate = 10 * CAPACITY
        warm = asyncio.run(open_loop(gw, CAPACITY / 2, 4, gw.key))  # at half capacity: all admitted
        baseline = psutil.Process(proc.pid).memory_info().rss
        samples, stop = rss_sampler(proc.pid)
        started = time.time()
        answers = asyncio.run(open_loop(gw, rate, seconds, limited))
        stop.set()
        assert proc.poll() is None, "the gateway died under overload"
        assert httpx.get(f"{gw.url}/health").status_code == 200
        assert httpx.get(f"{gw.url}/ready").status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert all(a.status == 200 for a in warm)

    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status != 200]
    assert {a.status for a in refused} <= {429, 503}, {a.status for a in refused}
    assert all(int(a.headers["Retry-After"]) >= 1 for a in refused)
    assert all(a.events[-1] == "data: [DONE]" for a in ok if a.stream)
    p50, p99 = (
        statistics.quantiles([a.seconds for a in ok], n=100)[49],
        statistics.quantiles([a.seconds for a in ok], n=100)[98],
    )
    # Admission keeps latency at the service time: queueing 10x the capacity for a minute would
    # instead push it to tens of seconds. The bound leaves room for a busy 2-core machine.
    assert p99 < 2 * SERVICE_S, f"admitted p99 {p99:.3f} s"
    assert len(ok) >= 0.5 * CAPACITY * seconds  # still serving at capacity, not collapsing
    growth = max(samples) - baseline
    assert growth < 100e6, f"gateway RSS grew {growth / 1e6:.0f} MB"
    rows = read_usage(started, time.time() + 1, url=gw.usage)  # the warm-up came before `started`
    assert len(rows) == len(answers)  # SIGTERM after the load: every request is in the usage log
    print(
        f"\noffered {rate:.0f} req/s ({len(answers)} requests, 10x capacity {CAPACITY:.0f}/s) "
        f"for {seconds} s: "
        f"admitted {len(ok)} ({len(ok) / seconds:.1f}/s), refused {len(refused)} "
        f"(429: {sum(a.status == 429 for a in refused)}, "
        f"503: {sum(a.status == 503 for a in refused)}); "
        f"admitted latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
        f"(service {SERVICE_S * 1000:.0f} ms); "
        f"RSS {baseline / 1e6:.0f} MB -> peak {max(samples) / 1e6:.0f} MB"
    )
