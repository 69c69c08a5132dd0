"""The load generator checked against `vllm bench serve`: both tools on one server, the same
prompts in the same order, level by level; output throughput and median TTFT side by side, and
each prompt's two TTFTs paired.

    slipway loadgen compare --base-url ... --model m --tokenizer DIR --out DIR
    slipway bench loadgen    # on a vLLM serving the embedded model: evaluation.benchmarks.loadgen
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import computed_field

from configs.evaluation import LoadProfile
from configs.home import Home
from configs.loader import Strict
from evaluation.loadgen.client import closed_loop, measure_level, payload, write_report
from evaluation.loadgen.report import (
    LoadReport,
    Prompt,
    RequestRecord,
    levels_of,
    load_prompts,
    percentile,
    pick_prompts,
    summarise_level,
)


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
        return percentile(diffs, 50)


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
        (p.id, payload(p.model_copy(update={"max_tokens": 1}), model, profile)) for p in prompts
    ]
    timeout = aiohttp.ClientTimeout(total=profile.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await closed_loop(session, url, bodies, concurrency, None)


def run_vllm_bench(command: list[str], result: Path, log: Path, expected: int) -> dict[str, Any]:
    """One `vllm bench serve` run; its saved result, after checking every prompt completed."""
    env = {**os.environ, "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cpu")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
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
        "median_ttft_ms": percentile(sorted(ttfts), 50) * 1000,
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
