"""A tier's priority reaches a real vLLM running priority scheduling and changes what it serves
first: the tiny model served one sequence at a time (`--max-num-seqs 1 --scheduling-policy
priority`), eight batch-tier requests sent at once, then one premium-tier request, through the
gateway with the backend's `priority_scheduling` on. vLLM serves a lower `priority` value first, so
the premium request overtakes the batch requests still waiting in vLLM; without the field it would
be served last (first come, first served). A second engine beside the shared one: `make stress`."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from configs.models import Serving
from serving.gateway.auth import key_hash
from serving.vllm import VLLMServer
from tests.evaluation.conftest import gateway_to

pytestmark = pytest.mark.stress

KEYS = {"bob": "sk-test-priority-batch", "pat": "sk-test-priority-premium"}
TIERS = {"premium": {"priority": 10}, "batch": {"priority": 0}}
# About 0.2 s each for the tiny model on this machine's one core.
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}
BATCH = 8


async def ask(base: str, who: str, done: list[str]) -> int:
    body = {"model": "tiny-prio", "messages": [{"role": "user", "content": who}], **LONG}
    headers = {"Authorization": f"Bearer {KEYS[who.split('-')[0]]}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        await r.read()
        done.append(who)
        return r.status


def test_a_premium_request_overtakes_batch_requests_waiting_in_vllm(tiny_model_source, home):
    serving = Serving(
        engine_args=[
            "--max-model-len",
            "256",
            "--max-num-seqs",
            "1",
            "--scheduling-policy",
            "priority",
        ]
    )
    tenants = [
        {"name": "bob", "key_sha256": key_hash(KEYS["bob"]), "tier": "batch"},
        {"name": "pat", "key_sha256": key_hash(KEYS["pat"]), "tier": "premium"},
    ]
    with (
        VLLMServer(tiny_model_source, "tiny-prio", home, serving) as engine,
        gateway_to(
            engine.url,
            "tiny-prio",
            "tiny-prio",
            home,
            tenants=tenants,
            queue={"tiers": TIERS},
            backend={"priority_scheduling": True},
        ) as base,
    ):

        async def go() -> tuple[list[int], list[str], float]:
            done: list[str] = []
            sent = [asyncio.ensure_future(ask(base, f"bob-{i}", done)) for i in range(BATCH)]
            await asyncio.sleep(0.1)  # all eight in vLLM: one generating, seven waiting
            start = time.monotonic()
            sent.append(asyncio.ensure_future(ask(base, "pat", done)))
            statuses = await asyncio.gather(*sent)
            return statuses, done, time.monotonic() - start

        statuses, done, took = asyncio.run(go())
    assert statuses == [200] * (BATCH + 1), statuses
    # First come, first served would finish it last (index 8). With its priority only the batch
    # request vLLM was generating when it arrived finishes first (or the next too, where that
    # one had just been scheduled): the others, waiting, come after it.
    assert done.index("pat") <= 2, f"finished in the order {done} ({took:.1f} s)"
