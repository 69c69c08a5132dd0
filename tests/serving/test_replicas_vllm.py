"""Two real vLLM replicas of the tiny model behind one version: the gateway shares the load
between them, and when one is killed (SIGKILL, mid-load) no plain request fails, only streams it
had begun break, its circuit opens, and latency during the kill stays bounded. Two engines beside
the shared one: `make stress`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import time

import aiohttp
import httpx
import pytest

from configs.models import Serving
from serving.vllm import VLLMServer
from tests.evaluation.conftest import ADMIN, KEY, gateway_to

pytestmark = pytest.mark.stress

SECONDS, KILL_AT, WORKERS = 20.0, 8.0, 6


def served_requests(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return int(
        sum(
            float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M)
        )
    )


async def load(
    base: str, victim: VLLMServer, urls: list[str]
) -> tuple[list[tuple], float, list[int]]:
    """WORKERS clients alternate plain and streamed requests; `victim` is SIGKILLed at KILL_AT,
    after each replica's served count is read."""
    answers: list[tuple] = []  # (started, seconds, stream, status, complete)
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {KEY}"}

    async def worker(i: int) -> None:
        n = i
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - start < SECONDS:
                stream = n % 2 == 1
                body = {
                    "model": "tiny-replicas",
                    "messages": [{"role": "user", "content": f"worker {i} says {n}"}],
                    "max_tokens": 24,
                    "ignore_eos": True,
                    "stream": stream,
                }
                began = time.monotonic()
                async with session.post(
                    f"{base}/v1/chat/completions", json=body, headers=headers
                ) as r:
                    data = await r.read()
                complete = b"data: [DONE]" in data if stream else r.status == 200
                answers.append((began, time.monotonic() - began, stream, r.status, complete))
                n += 1

    async def killer() -> tuple[float, list[int]]:
        await asyncio.sleep(KILL_AT)
        before = [await asyncio.to_thread(served_requests, u) for u in urls]
        os.killpg(victim.pid, signal.SIGKILL)  # the engine and its workers: no goodbye
        return time.monotonic(), before

    *_, (killed, before) = await asyncio.gather(*(worker(i) for i in range(WORKERS)), killer())
    return answers, killed, before


def test_two_replicas_share_the_load_and_one_killed_fails_no_plain_request(tiny_model_source, home):
    serving = Serving(engine_args=["--max-model-len", "256"])
    with (
        VLLMServer(tiny_model_source, "tiny-replicas", home, serving) as one,
        VLLMServer(tiny_model_source, "tiny-replicas", home, serving) as two,
        gateway_to(
            one.url,
            "tiny-replicas",
            "tiny-replicas",
            home,
            backend={"replicas": [two.url]},
            breaker={"failures": 3, "open_s": 600},
            balance={"poll_s": 0.5},
        ) as base,
    ):
        answers, killed, before = asyncio.run(load(base, two, [one.url, two.url]))
        stats = httpx.get(
            f"{base}/admin/stats/tiny-replicas", headers={"Authorization": f"Bearer {ADMIN}"}
        ).json()["backends"][0]

    assert min(before) > 0.25 * sum(before), before  # both replicas served before the kill
    plain = [a for a in answers if not a[2]]
    assert plain and all(a[3] == 200 for a in plain), [a for a in plain if a[3] != 200][:3]
    broken = [a for a in answers if a[2] and not a[4]]
    assert all(a[0] < killed for a in broken)  # only streams the dead replica had begun
    after = [a for a in answers if a[0] > killed + 1.0]
    assert after and all(a[3] == 200 and a[4] for a in after)
    circuits = {r["url"]: r["circuit"] for r in stats["replicas"]}
    assert circuits == {one.url: "closed", two.url: "open"}, circuits
    during = sorted(a[1] for a in plain if killed - 0.5 <= a[0] <= killed + 5)
    assert during and during[-1] < 10.0, during[-5:]  # retried at once, never a hang
    calm = [a[1] for a in plain if a[0] < killed - 1]
    print(
        f"\nbefore the kill: {before} requests per replica; {len(plain)} plain requests, all 200; "
        f"{len(broken)} streams broken off; plain latency p50 {statistics.median(calm):.3f} s "
        f"before, worst {during[-1]:.3f} s within 5 s of the kill"
    )
