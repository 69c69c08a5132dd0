"""Load generator for any OpenAI-compatible server (/v1/completions or /v1/chat/completions).

Streams every request and times it on the client: TTFT (request sent -> first generated chunk),
ITL (between generated chunks), TPOT ((latency - TTFT) / (output tokens - 1)) and end-to-end
latency (request sent -> last generated chunk), the definitions `vllm bench serve` uses, so the
two can be compared (`compare` below). Output tokens come from the streamed usage
(stream_options.include_usage) when the server sends it, else one per generated chunk.

Profiles (configs.evaluation.LoadProfile): synchronous (one request at a time), a concurrency
sweep (closed loop: N requests always in flight), or Poisson arrivals at a fixed rate. Each level
sends its warm-up requests first and leaves them out of the figures.

    python -m evaluation.loadgen run --base-url http://127.0.0.1:8000 --model m --out DIR
    python -m evaluation.loadgen compare --base-url ... --model m --tokenizer DIR --out DIR
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import aiohttp
from pydantic import computed_field
from tqdm import tqdm

from configs.evaluation import LoadProfile
from configs.home import Home
from configs.loader import Strict


class Prompt(Strict):
    id: str
    prompt: str
    max_tokens: int


class RequestRecord(Strict):
    """One measured request; times in seconds, `start` relative to the level's start."""

    prompt_id: str
    start: float
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = []
    output_tokens: int = 0
    prompt_tokens: int | None = None
    tokens_from_usage: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


class Percentiles(Strict):
    """Milliseconds; None when there was nothing to measure (e.g. TPOT of one-token answers)."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values_s: Sequence[float]) -> Percentiles:
        if not values_s:
            return cls(mean=None, p50=None, p90=None, p99=None)
        ms = sorted(v * 1000 for v in values_s)
        return cls(
            mean=sum(ms) / len(ms),
            p50=_percentile(ms, 50),
            p90=_percentile(ms, 90),
            p99=_percentile(ms, 99),
        )


class LevelSummary(Strict):
    label: str
    concurrency: int | None
    rate: float | None
    completed: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_output_tokens: int
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles
    slo_ttft_ms: float
    slo_tpot_ms: float
    goodput_share: float
    goodput_per_s: float
    token_source: Literal["usage", "chunks", "mixed", "none"]
    errors: list[str]


class LoadReport(Strict):
    base_url: str
    model: str
    endpoint: str
    profile: LoadProfile
    levels: list[LevelSummary]

    def level(self, concurrency: int) -> LevelSummary | None:
        """The level at `concurrency`; a Poisson run has one level and answers for any."""
        if len(self.levels) == 1 and self.levels[0].concurrency is None:
            return self.levels[0]
        return next((x for x in self.levels if x.concurrency == concurrency), None)


# ---- pure parts ----------------------------------------------------------------------------------


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def load_prompts(
    path: Path, *, max_tokens: int | None = None, max_chars: int | None = None
) -> list[Prompt]:
    """Prompts from JSONL lines {"id"?, "prompt", "output_tokens"} (vllm bench's custom format)."""
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = Prompt(
                id=str(row.get("id", n)), prompt=row["prompt"], max_tokens=int(row["output_tokens"])
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{n}: need a JSON object with prompt and output_tokens ({e})"
            ) from e
        if max_chars is None or len(prompt.prompt) <= max_chars:
            cap = min(prompt.max_tokens, max_tokens or prompt.max_tokens)
            prompts.append(prompt.model_copy(update={"max_tokens": cap}))
    if not prompts:
        raise ValueError(f"{path}: no prompts (max_chars={max_chars})")
    return prompts


def pick_prompts(prompts: Sequence[Prompt], n: int, seed: int) -> list[Prompt]:
    """n prompts in a seeded random order (cycling when n exceeds the set): the file is sorted
    by length, so taking its head would measure only the short ones."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def generated(data: dict[str, Any]) -> bool:
    """Whether one streamed message carries generated output (not the chat role announcement
    or the final usage-only message)."""
    choices = data.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    if "delta" in choice:
        delta = choice["delta"] or {}
        return any(delta.get(k) for k in ("content", "reasoning_content", "reasoning"))
    return choice.get("text") is not None


def record_from_stream(
    prompt_id: str, start: float, sent: float, messages: Sequence[tuple[float, dict[str, Any]]]
) -> RequestRecord:
    """Timings of one request from its streamed messages, each with its arrival time (seconds,
    same clock as `sent`, the moment the request went out). `start` is `sent` relative to the
    level's start."""
    times = [t for t, data in messages if generated(data)]
    usage = next((d["usage"] for _, d in reversed(messages) if d.get("usage")), None)
    if not times:
        return RequestRecord(
            prompt_id=prompt_id, start=start, error="no generated output in the stream"
        )
    tokens = usage.get("completion_tokens") if usage else None
    return RequestRecord(
        prompt_id=prompt_id,
        start=start,
        ttft=times[0] - sent,
        latency=times[-1] - sent,
        itl=[b - a for a, b in zip(times, times[1:], strict=False)],
        output_tokens=tokens if tokens is not None else len(times),
        prompt_tokens=usage.get("prompt_tokens") if usage else None,
        tokens_from_usage=tokens is not None,
    )


def summarise(
    records: Sequence[RequestRecord],
    *,
    label: str,
    slo_ttft_ms: float,
    slo_tpot_ms: float,
    concurrency: int | None = None,
    rate: float | None = None,
) -> LevelSummary:
    """One level's figures. Duration runs from the first request sent to the last one finished;
    a request is good when its TTFT and TPOT both meet the SLOs (a one-token answer has no TPOT)."""
    ok = [r for r in records if r.ok]
    ends = [r.start + (r.latency or 0.0) for r in ok]
    duration = max(ends) - min(r.start for r in records) if ok else 0.0
    tokens = sum(r.output_tokens for r in ok)
    good = [
        r
        for r in ok
        if r.ttft is not None
        and r.ttft * 1000 <= slo_ttft_ms
        and (r.tpot is None or r.tpot * 1000 <= slo_tpot_ms)
    ]
    from_usage = sum(r.tokens_from_usage for r in ok)
    source = (
        "none"
        if not ok
        else "usage"
        if from_usage == len(ok)
        else "chunks"
        if not from_usage
        else "mixed"
    )

    def per_s(count: int) -> float:
        return count / duration if duration > 0 else 0.0

    return LevelSummary(
        label=label,
        concurrency=concurrency,
        rate=rate,
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration,
        requests_per_s=per_s(len(ok)),
        output_tokens_per_s=per_s(tokens),
        total_output_tokens=tokens,
        ttft_ms=Percentiles.of([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=Percentiles.of([r.tpot for r in ok if r.tpot is not None]),
        itl_ms=Percentiles.of([x for r in ok for x in r.itl]),
        e2e_ms=Percentiles.of([r.latency for r in ok if r.latency is not None]),
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        goodput_share=len(good) / len(records) if records else 0.0,
        goodput_per_s=per_s(len(good)),
        token_source=source,
        errors=sorted({r.error for r in records if r.error})[:5],
    )


# ---- the client ----------------------------------------------------------------------------------


def _payload(prompt: Prompt, model: str, profile: LoadProfile) -> dict[str, Any]:
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


async def _closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    bodies: list[tuple[str, dict]],
    concurrency: int,
    bar: tqdm | None,
) -> list[RequestRecord]:
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


def level_label(profile: LoadProfile, concurrency: int | None) -> str:
    if profile.mode == "synchronous":
        return "synchronous"
    if concurrency is not None:
        return f"concurrency {concurrency}"
    return f"poisson {profile.rate:g} req/s"


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
    bodies = [(p.id, _payload(p, model, profile)) for p in chosen]
    warmup, measured = bodies[: profile.warmup], bodies[profile.warmup :]
    width = concurrency or profile.max_concurrency or 0
    connector = aiohttp.TCPConnector(limit=width)  # 0: unlimited
    timeout = aiohttp.ClientTimeout(total=profile.timeout_s)
    label = level_label(profile, concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if warmup:
            await _closed_loop(session, url, warmup, concurrency or 1, None)
        with tqdm(total=len(measured), desc=label, unit="req", disable=not progress) as bar:
            if concurrency is not None:
                records = await _closed_loop(session, url, measured, concurrency, bar)
            else:
                assert profile.rate is not None  # LoadProfile guarantees it for poisson
                records = await _poisson(
                    session, url, measured, profile.rate, profile.max_concurrency, profile.seed, bar
                )
    return sorted(records, key=lambda r: r.start)


def summarise_level(
    records: Sequence[RequestRecord], profile: LoadProfile, concurrency: int | None
) -> LevelSummary:
    return summarise(
        records,
        label=level_label(profile, concurrency),
        slo_ttft_ms=profile.slo_ttft_ms,
        slo_tpot_ms=profile.slo_tpot_ms,
        concurrency=concurrency,
        rate=profile.rate,
    )


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


def levels_of(profile: LoadProfile) -> list[int | None]:
    """Concurrency per level; None is the single open-loop (Poisson) level."""
    if profile.mode == "synchronous":
        return [1]
    if profile.mode == "sweep":
        return list(profile.concurrency)
    return [None]


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


def plot(report: LoadReport, path: Path) -> None:
    """Latency (left) and throughput (right) against concurrency, one point per level."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    levels = report.levels
    xs = [lv.concurrency if lv.concurrency is not None else i + 1 for i, lv in enumerate(levels)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in [
        ("TTFT p50", [lv.ttft_ms.p50 for lv in levels]),
        ("TTFT p99", [lv.ttft_ms.p99 for lv in levels]),
        ("TPOT p50", [lv.tpot_ms.p50 for lv in levels]),
        ("e2e p50", [lv.e2e_ms.p50 for lv in levels]),
    ]:
        left.plot(xs, values, marker="o", label=name)
    left.set(xlabel="concurrency", ylabel="ms", title="Latency")
    right.plot(xs, [lv.output_tokens_per_s for lv in levels], marker="o", label="output tokens/s")
    twin = right.twinx()
    twin.plot(
        xs, [lv.requests_per_s for lv in levels], marker="s", color="tab:green", label="requests/s"
    )
    twin.plot(
        xs, [lv.goodput_per_s for lv in levels], marker="^", color="tab:red", label="goodput req/s"
    )
    right.set(xlabel="concurrency", ylabel="output tokens/s", title="Throughput")
    twin.set_ylabel("requests/s")
    for axis in (left, right):
        axis.set_xticks(xs, [lv.label.removeprefix("concurrency ") for lv in levels])
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    handles = right.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    right.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=8)
    fig.suptitle(f"{report.model} @ {report.base_url} ({report.endpoint})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- background load -----------------------------------------------------------------------------


class BackgroundLoad:
    """Poisson arrivals at `rate` requests/s on a thread of its own until the context ends: the
    rollout's synthetic traffic when organic traffic is too thin to judge a step in time.

    Streams chat completions with the API key of a tenant the gateway marks `synthetic`, so its
    samples are kept apart from organic ones. Counts what it sent; never raises for a failure.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        rate: float,
        prompts: Sequence[Prompt],
        max_tokens: int = 16,
        seed: int = 0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.rate = rate
        self.prompts = pick_prompts(prompts, len(prompts), seed)
        self.max_tokens = max_tokens
        self.seed = seed
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synthetic-load", daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        rng = random.Random(self.seed)
        pending: set[asyncio.Task] = set()
        async with aiohttp.ClientSession(
            headers=self.headers, timeout=aiohttp.ClientTimeout(total=120)
        ) as session:
            while not self._stop.is_set():
                prompt = self.prompts[self.sent % len(self.prompts)]
                body = {"model": self.model, "messages": [{"role": "user", "content": prompt.prompt}],
                        "max_tokens": min(prompt.max_tokens, self.max_tokens), "temperature": 0,
                        "stream": True}  # fmt: skip
                task = asyncio.create_task(send(session, self.url, body, prompt.id, 0.0))
                task.add_done_callback(self._count)
                pending.add(task)
                task.add_done_callback(pending.discard)
                self.sent += 1
                await asyncio.sleep(rng.expovariate(self.rate))
            if pending:  # let what is in flight finish, as a client would
                await asyncio.wait(pending, timeout=30)

    def _count(self, task: asyncio.Task) -> None:
        if task.cancelled() or not task.result().ok:
            self.failed += 1


# ---- cross-check with vllm bench serve -----------------------------------------------------------


class BenchLevel(Strict):
    concurrency: int
    ours_output_tokens_per_s: float
    bench_output_tokens_per_s: float
    ours_ttft_p50_ms: float
    bench_ttft_p50_ms: float
    ours_requests_per_s: float
    bench_requests_per_s: float
    # Per prompt, in the order sent; the i-th of each is the same prompt.
    ours_ttfts_ms: list[float]
    bench_ttfts_ms: list[float]

    @computed_field
    @property
    def throughput_diff(self) -> float:
        return self.ours_output_tokens_per_s / self.bench_output_tokens_per_s - 1

    @computed_field
    @property
    def ttft_diff(self) -> float:
        return self.ours_ttft_p50_ms / self.bench_ttft_p50_ms - 1

    @computed_field
    @property
    def paired_ttft_diff_ms(self) -> float:
        """Median over prompts of (ours - vllm bench): what is left when the two medians' own
        run-to-run noise is taken out."""
        diffs = sorted(o - b for o, b in zip(self.ours_ttfts_ms, self.bench_ttfts_ms, strict=True))
        return _percentile(diffs, 50)


class BenchComparison(Strict):
    tolerance: float
    levels: list[BenchLevel]

    @computed_field
    @property
    def agree(self) -> bool:
        return all(
            abs(x.throughput_diff) <= self.tolerance and abs(x.ttft_diff) <= self.tolerance
            for x in self.levels
        )

    def markdown(self) -> str:
        rows = [
            "| concurrency | output tok/s: ours / vllm bench | diff "
            "| TTFT p50 ms: ours / vllm bench | diff | same prompt, median of ours - bench |",
            "|---|---|---|---|---|---|",
        ]
        for x in self.levels:
            tokens = f"{x.ours_output_tokens_per_s:.1f} / {x.bench_output_tokens_per_s:.1f}"
            ttft = f"{x.ours_ttft_p50_ms:.1f} / {x.bench_ttft_p50_ms:.1f}"
            rows.append(
                f"| {x.concurrency} | {tokens} | {x.throughput_diff:+.1%} | {ttft} "
                f"| {x.ttft_diff:+.1%} | {x.paired_ttft_diff_ms:+.1f} ms |"
            )
        return "\n".join(rows) + f"\n\nagree within {self.tolerance:.0%}: {self.agree}\n"


def plot_comparison(comparison: BenchComparison, path: Path) -> None:
    """TTFT distributions of both tools, one panel per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = comparison.levels
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4), squeeze=False)
    for axis, x in zip(axes[0], levels, strict=True):
        for name, values in (("loadgen", x.ours_ttfts_ms), ("vllm bench serve", x.bench_ttfts_ms)):
            xs = sorted(values)
            axis.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
        axis.set(
            xlabel="TTFT (ms)",
            ylabel="share of requests",
            title=f"concurrency {x.concurrency}: p50 {x.ttft_diff:+.1%}",
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired_ttfts(records: Sequence[RequestRecord], bench: dict[str, Any]) -> list[float]:
    """vllm bench's per-request TTFTs (ms) in our send order; raises when the i-th requests of
    the two runs were not the same prompt (their prompt token counts, both from the server's
    usage, differ)."""
    ours = [r.prompt_tokens for r in records]
    if ours != bench["input_lens"]:
        raise RuntimeError(
            "the two runs did not send the same prompts in the same order: prompt tokens "
            f"{ours[:8]}... (ours) vs {bench['input_lens'][:8]}... (vllm bench)"
        )
    return [t * 1000 for t in bench["ttfts"]]


def vllm_bench_command(
    vllm: Path,
    base_url: str,
    model: str,
    tokenizer_dir: Path,
    dataset: Path,
    *,
    concurrency: int,
    num_prompts: int,
    output_tokens: int,
    warmup: int,
    ignore_eos: bool,
    result_dir: Path,
    result_name: str,
) -> list[str]:
    """`vllm bench serve` on the same prompts, in the same order, at the same concurrency."""
    command = [
        str(vllm),
        "bench",
        "serve",
        "--backend",
        "openai",
        "--endpoint",
        "/v1/completions",
        "--base-url",
        base_url.rstrip("/"),
        "--model",
        model,
        "--tokenizer",
        str(tokenizer_dir),
        "--dataset-name",
        "sharegpt",
        "--dataset-path",
        str(dataset),
        "--sharegpt-output-len",
        str(output_tokens),
        "--disable-shuffle",
        "--num-prompts",
        str(num_prompts),
        "--num-warmups",
        str(warmup),
        "--max-concurrency",
        str(concurrency),
        "--request-rate",
        "inf",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--temperature",
        "0",
        "--save-result",
        "--save-detailed",  # per-request TTFTs, to pair with ours prompt by prompt
        "--result-dir",
        str(result_dir),
        "--result-filename",
        result_name,
    ]
    return command + (["--ignore-eos"] if ignore_eos else [])


def sharegpt(prompts: Sequence[Prompt]) -> str:
    """The prompts as a ShareGPT file. vllm bench's `custom` (JSONL) loader needs pandas, which
    the serve environment lacks; its ShareGPT loader reads plain JSON but takes one output
    length for all prompts."""
    return json.dumps(
        [
            {
                "id": p.id,
                "conversations": [
                    {"from": "human", "value": p.prompt},
                    {"from": "gpt", "value": ""},
                ],
            }
            for p in prompts
        ]
    )


async def prime(
    base_url: str, model: str, profile: LoadProfile, prompts: Sequence[Prompt], concurrency: int
) -> None:
    """Send each prompt once for a single token, unmeasured."""
    url = base_url.rstrip("/") + "/v1/completions"
    bodies = [
        (p.id, _payload(p.model_copy(update={"max_tokens": 1}), model, profile)) for p in prompts
    ]
    timeout = aiohttp.ClientTimeout(total=profile.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _closed_loop(session, url, bodies, concurrency, None)


def run_vllm_bench(command: list[str], result: Path, log: Path, expected: int) -> dict[str, Any]:
    """One `vllm bench serve` run; its saved result, after checking every prompt completed."""
    env = {**os.environ, "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cpu")}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(
            f"vllm bench serve failed ({done.returncode}); see {log}:\n{done.stderr[-2000:]}"
        )
    bench = json.loads(result.read_text())
    if bench["completed"] != expected:
        raise RuntimeError(
            f"vllm bench completed {bench['completed']} of {expected} "
            f"prompts (it skips prompts under 4 or over 1024 tokens); see {log}"
        )
    return bench


def pool_bench(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several `vllm bench serve` results as one run: rates over the summed durations, the
    per-request lists joined in order, the median (numpy's, as vllm bench takes it) of them all."""
    duration = sum(r["duration"] for r in runs)
    ttfts = [t for r in runs for t in r["ttfts"]]
    return {
        "output_throughput": sum(r["total_output_tokens"] for r in runs) / duration,
        "request_throughput": sum(r["completed"] for r in runs) / duration,
        "median_ttft_ms": _percentile(sorted(ttfts), 50) * 1000,
        "ttfts": ttfts,
        "input_lens": [n for r in runs for n in r["input_lens"]],
    }


def end_to_end(runs: Sequence[Sequence[RequestRecord]]) -> list[RequestRecord]:
    """Several runs' records as one run, each laid after the one before (its start times, relative
    to its own start, shifted by the spans before it): one summary's duration is then their sum."""
    out: list[RequestRecord] = []
    offset = 0.0
    for records in runs:
        out += [r.model_copy(update={"start": r.start + offset}) for r in records]
        offset += max((r.start + (r.latency or 0.0) for r in records if r.ok), default=0.0)
    return out


def compare_with_vllm_bench(
    base_url: str,
    model: str,
    tokenizer_dir: Path,
    profile: LoadProfile,
    out_dir: Path,
    *,
    vllm: Path | None = None,
    tolerance: float = 0.05,
) -> BenchComparison:
    """Run `vllm bench serve` (serve env) and this generator, level by level, on one server with
    the same prompts in the same order; report output throughput and median TTFT side by side,
    and each prompt's two TTFTs paired. Every prompt gets the same output length,
    profile.max_tokens (default 64). Writes comparison.{json,md,png} and our report to out_dir.

    Concurrency c measures profile.num_prompts * c prompts, so every level takes about as long:
    TTFT under concurrency depends on where a request lands in the batch (its spread at c=4 gave
    each run's median of 64 requests a ~7% bootstrap error), and the median needs the samples.

    vLLM's speed drifts while it runs (a fresh CPU server got 4% faster over its first minutes,
    measured), so whichever tool ran second looked faster. Each level therefore runs A-B-B-A:
    vllm bench on the first half of the prompts, this generator on the first half, this
    generator on the second half, vllm bench on the second half; each tool's halves are pooled,
    and a steady drift cancels."""
    if profile.endpoint != "completions":
        raise ValueError("the comparison drives /v1/completions; set endpoint: completions")
    if profile.mode == "poisson":
        raise ValueError("the comparison needs a closed-loop profile (synchronous or sweep)")
    if profile.num_prompts < 2:
        raise ValueError("the comparison splits the prompts in two halves: num_prompts >= 2")
    vllm = vllm or Home.from_env().envs / "serve" / "bin" / "vllm"
    if not vllm.exists():
        raise FileNotFoundError(f"{vllm} not found: build the serve environment (make setup)")
    out_dir.mkdir(parents=True, exist_ok=True)
    output_tokens = profile.max_tokens or 64
    prompts = [
        p.model_copy(update={"max_tokens": output_tokens})
        for p in load_prompts(profile.prompts, max_chars=profile.max_prompt_chars)
    ]
    concurrencies = [c for c in levels_of(profile) if c is not None]
    # Whichever tool sent a prompt first would pay its prefill and the other would hit vLLM's
    # prefix cache (4x lower mean TTFT measured); one unmeasured pass puts both on equal footing.
    # pick_prompts(n) is a prefix of pick_prompts(m > n): priming the largest level primes all.
    largest = pick_prompts(
        prompts, profile.warmup + profile.num_prompts * max(concurrencies), profile.seed
    )
    asyncio.run(prime(base_url, model, profile, largest, max(concurrencies)))
    warmup = largest[: profile.warmup]

    def halves(concurrency: int) -> dict[str, list[Prompt]]:
        measured = largest[profile.warmup : profile.warmup + profile.num_prompts * concurrency]
        return {"a": measured[: len(measured) // 2], "b": measured[len(measured) // 2 :]}

    def bench(concurrency: int, half: str) -> dict[str, Any]:
        name = f"vllm-bench-c{concurrency}-{half}"
        items = halves(concurrency)[half]
        # vllm bench warms up on the head of its list, then measures the whole list.
        dataset = out_dir / f"{name}-prompts.json"
        dataset.write_text(sharegpt(items))
        command = vllm_bench_command(
            vllm,
            base_url,
            model,
            tokenizer_dir,
            dataset,
            concurrency=concurrency,
            num_prompts=len(items),
            output_tokens=output_tokens,
            warmup=profile.warmup,
            ignore_eos=profile.ignore_eos,
            result_dir=out_dir,
            result_name=f"{name}.json",
        )
        return run_vllm_bench(
            command, out_dir / f"{name}.json", out_dir / f"{name}.log", len(items)
        )

    def ours(concurrency: int, half: str) -> list[RequestRecord]:
        return asyncio.run(
            measure_level(
                base_url,
                model,
                profile,
                [*warmup, *halves(concurrency)[half]],
                concurrency=concurrency,
            )
        )

    levels, summaries = [], []
    for c in concurrencies:
        bench_a = bench(c, "a")
        ours_a, ours_b = ours(c, "a"), ours(c, "b")
        pooled = pool_bench([bench_a, bench(c, "b")])
        level = summarise_level(end_to_end([ours_a, ours_b]), profile, c)
        if level.failed or level.ttft_ms.p50 is None:
            raise RuntimeError(
                f"{level.failed} of our requests failed at {level.label}: {'; '.join(level.errors)}"
            )
        summaries.append(level)
        sent = [*ours_a, *ours_b]
        levels.append(
            BenchLevel(
                concurrency=c,
                ours_output_tokens_per_s=level.output_tokens_per_s,
                bench_output_tokens_per_s=pooled["output_throughput"],
                ours_ttft_p50_ms=level.ttft_ms.p50,
                bench_ttft_p50_ms=pooled["median_ttft_ms"],
                ours_requests_per_s=level.requests_per_s,
                bench_requests_per_s=pooled["request_throughput"],
                ours_ttfts_ms=[r.ttft * 1000 for r in sent if r.ttft is not None],
                bench_ttfts_ms=paired_ttfts(sent, pooled),
            )
        )
    comparison = BenchComparison(tolerance=tolerance, levels=levels)
    write_report(
        LoadReport(
            base_url=base_url,
            model=model,
            endpoint=profile.endpoint,
            profile=profile,
            levels=summaries,
        ),
        out_dir,
    )
    (out_dir / "comparison.json").write_text(comparison.model_dump_json(indent=2))
    (out_dir / "comparison.md").write_text(comparison.markdown())
    plot_comparison(comparison, out_dir / "comparison.png")
    return comparison
