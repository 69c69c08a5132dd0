"""Sending the load: one streamed request, the closed-loop and Poisson drivers, a level measured
and summarised, a whole profile run and its files (report.json and report.png).

A failed request is recorded, never raised, so a level's summary counts it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from configs.evaluation import LoadProfile
from evaluation.loadgen.plot import plot
from evaluation.loadgen.report import (
    LevelSummary,
    LoadReport,
    Prompt,
    RequestRecord,
    level_label,
    levels_of,
    load_prompts,
    pick_prompts,
    record_from_stream,
    summarise_level,
)


def payload(prompt: Prompt, model: str, profile: LoadProfile) -> dict[str, Any]:
    """The request body: streamed with its usage, greedy, on the profile's endpoint."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": prompt.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if profile.ignore_eos:
        body["ignore_eos"] = True
    if profile.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.prompt}]
    else:
        body["prompt"] = prompt.prompt
    return body


async def send(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], prompt_id: str, t0: float
) -> RequestRecord:
    """One streamed request; never raises for a failed request, which is recorded instead."""
    sent = time.perf_counter()
    messages: list[tuple[float, dict[str, Any]]] = []
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                text = (await response.text())[:300]
                return RequestRecord(
                    prompt_id=prompt_id, start=sent - t0, error=f"HTTP {response.status}: {text}"
                )
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and SSE comments (keep-alive pings)
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                messages.append((time.perf_counter(), json.loads(data)))
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        return RequestRecord(prompt_id=prompt_id, start=sent - t0, error=f"{type(e).__name__}: {e}")
    return record_from_stream(prompt_id, sent - t0, sent, messages)


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    bodies: list[tuple[str, dict]],
    concurrency: int,
    bar: tqdm | None,
) -> list[RequestRecord]:
    """Send `bodies` (prompt id, body) with `concurrency` requests always in flight."""
    queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    records: list[RequestRecord] = []
    t0 = time.perf_counter()

    async def worker() -> None:
        while not queue.empty():
            prompt_id, body = queue.get_nowait()
            records.append(await send(session, url, body, prompt_id, t0))
            if bar:
                bar.update(1)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def _poisson(
    session: aiohttp.ClientSession,
    url: str,
    bodies: list[tuple[str, dict]],
    rate: float,
    max_concurrency: int | None,
    seed: int,
    bar: tqdm | None,
) -> list[RequestRecord]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()

    async def one(prompt_id: str, body: dict) -> RequestRecord:
        if limit:
            async with limit:
                record = await send(session, url, body, prompt_id, t0)
        else:
            record = await send(session, url, body, prompt_id, t0)
        if bar:
            bar.update(1)
        return record

    tasks = []
    for prompt_id, body in bodies:
        tasks.append(asyncio.create_task(one(prompt_id, body)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


async def measure_level(
    base_url: str,
    model: str,
    profile: LoadProfile,
    chosen: Sequence[Prompt],
    *,
    concurrency: int | None,
    progress: bool = True,
) -> list[RequestRecord]:
    """Warm up on the first profile.warmup of `chosen`, then time the rest: closed loop at
    `concurrency`, or Poisson when None. The records come in the order the requests were sent."""
    path = "/v1/chat/completions" if profile.endpoint == "chat" else "/v1/completions"
    url = base_url.rstrip("/") + path
    bodies = [(p.id, payload(p, model, profile)) for p in chosen]
    warmup, measured = bodies[: profile.warmup], bodies[profile.warmup :]
    width = concurrency or profile.max_concurrency or 0
    connector = aiohttp.TCPConnector(limit=width)  # 0: unlimited
    timeout = aiohttp.ClientTimeout(total=profile.timeout_s)
    label = level_label(profile, concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if warmup:
            await closed_loop(session, url, warmup, concurrency or 1, None)
        with tqdm(total=len(measured), desc=label, unit="req", disable=not progress) as bar:
            if concurrency is not None:
                records = await closed_loop(session, url, measured, concurrency, bar)
            else:
                assert profile.rate is not None  # LoadProfile guarantees it for poisson
                records = await _poisson(
                    session, url, measured, profile.rate, profile.max_concurrency, profile.seed, bar
                )
    return sorted(records, key=lambda r: r.start)


async def run_level(
    base_url: str,
    model: str,
    profile: LoadProfile,
    prompts: Sequence[Prompt],
    *,
    concurrency: int | None,
    progress: bool = True,
) -> LevelSummary:
    """One level measured and summarised (see measure_level), on prompts picked from `prompts`."""
    chosen = pick_prompts(prompts, profile.warmup + profile.num_prompts, profile.seed)
    records = await measure_level(
        base_url, model, profile, chosen, concurrency=concurrency, progress=progress
    )
    return summarise_level(records, profile, concurrency)


def run_profile(
    base_url: str,
    model: str,
    profile: LoadProfile,
    out_dir: Path | None = None,
    *,
    progress: bool = True,
) -> LoadReport:
    """Run every level of `profile` against the server; with out_dir, write report.json and
    report.png there."""
    prompts = load_prompts(
        profile.prompts, max_tokens=profile.max_tokens, max_chars=profile.max_prompt_chars
    )
    levels = [
        asyncio.run(run_level(base_url, model, profile, prompts, concurrency=c, progress=progress))
        for c in levels_of(profile)
    ]
    report = LoadReport(
        base_url=base_url, model=model, endpoint=profile.endpoint, profile=profile, levels=levels
    )
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def write_report(report: LoadReport, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(report.model_dump_json(indent=2))
    plot(report, out_dir / "report.png")
