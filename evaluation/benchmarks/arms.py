"""Two engines side by side, as a rollout runs them: how much slower (or faster) is B than A on
the same prompts, and how far apart are their answers? The truth a canary analysis should find.

Both engines serve at once on the same machine, driven at the rollout's synthetic rate with the
rollout's prompts (greedy, streamed chat, max_tokens 16). Two phases, each with its own figures:

- paired: every arrival sends the same prompt to both engines at the same moment (as the gateway
  mirrors), in four blocks whose send order runs A-B-B-A, so neither engine is always first and
  a drift of the machine over the run cancels. Per pair, the ratio B/A of TTFT, TPOT and
  end-to-end latency; the median and geometric mean of the ratios, with bootstrap 95% intervals;
  and the answers' agreement (evaluation/quality/agreement.py, the rollout's default bounds).
- split: every arrival goes to one engine, chosen by a fair coin, as a live canary step shares
  traffic; the ratio of the two engines' geometric means and of their medians, with intervals.

Every request is written to samples.jsonl (phase, block, arm, prompt, timings, tokens, text), so
the figures can be recomputed, and the paired phase to pairs.jsonl, the form the canary
simulation reads recorded latencies in (evaluation/benchmarks/canary_mirrored.py).

    slipway bench arms --a http://127.0.0.1:8001=smol-v1 --b http://127.0.0.1:8002=smol-v2
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from configs.evaluation import PROMPTS
from configs.rollout import QualityPolicy
from evaluation.loadgen.client import send
from evaluation.loadgen.report import RequestRecord, load_prompts, pick_prompts
from evaluation.quality.agreement import score

METRICS = ("ttft", "tpot", "e2e")
ORDER = "ABBA"


def _metric(record: RequestRecord, metric: str) -> float | None:
    value = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.latency}[metric]
    return value if value is not None and value > 0 else None


def _body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def interval(values: Sequence[float], statistic, rounds: int = 2000, seed: int = 0):
    """The statistic of `values` and its bootstrap 95% percentile interval."""
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = [statistic(data[rng.integers(0, data.size, data.size)]) for _ in range(rounds)]
    low, high = np.quantile(boots, [0.025, 0.975])
    return float(statistic(data)), float(low), float(high)


def geometric_mean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


def paired_figures(pairs: list[tuple[RequestRecord, RequestRecord]]) -> dict[str, Any]:
    """Ratios B/A per pair, and the answers' agreement."""
    out: dict[str, Any] = {"pairs": len(pairs)}
    for metric in METRICS:
        ratios = [
            b / a
            for ra, rb in pairs
            if (a := _metric(ra, metric)) is not None and (b := _metric(rb, metric)) is not None
        ]
        if len(ratios) < 2:
            continue
        median, lo, hi = interval(ratios, np.median)
        gmean, glo, ghi = interval(ratios, geometric_mean)
        out[metric] = {
            "n": len(ratios),
            "median_ratio": [median, lo, hi],
            "geometric_mean_ratio": [gmean, glo, ghi],
            "share_over_1.25": float(np.mean(np.asarray(ratios) > 1.25)),
        }
    policy = QualityPolicy()
    scores = [
        score(
            {},
            {"text": a.text, "completion_tokens": a.output_tokens},
            {"text": b.text, "completion_tokens": b.output_tokens},
            policy,
        )
        for a, b in pairs
        if a.ok and b.ok
    ]
    if scores:
        out["answers"] = {
            "scored": len(scores),
            "identical": float(np.mean([s.exact for s in scores])),
            "median_token_agreement": float(np.median([s.tokens for s in scores])),
            "degraded": float(np.mean([s.degraded for s in scores])),
        }
    return out


def split_figures(a: list[RequestRecord], b: list[RequestRecord]) -> dict[str, Any]:
    """Ratios of B's to A's geometric mean and median, with intervals (independent resamples)."""
    out: dict[str, Any] = {"requests": {"A": len(a), "B": len(b)}}
    rng = np.random.default_rng(1)
    for metric in METRICS:
        xa = np.asarray([v for r in a if (v := _metric(r, metric)) is not None])
        xb = np.asarray([v for r in b if (v := _metric(r, metric)) is not None])
        if xa.size < 2 or xb.size < 2:
            continue
        figures = {}
        for name, stat in (("geometric_mean_ratio", geometric_mean), ("median_ratio", np.median)):
            boots = [
                stat(xb[rng.integers(0, xb.size, xb.size)])
                / stat(xa[rng.integers(0, xa.size, xa.size)])
                for _ in range(2000)
            ]
            figures[name] = [
                float(stat(xb) / stat(xa)),
                float(np.quantile(boots, 0.025)),
                float(np.quantile(boots, 0.975)),
            ]
        out[metric] = {"n": [int(xa.size), int(xb.size)], **figures}
    return out


async def _run(
    arms: dict[str, tuple[str, str]],
    prompts: list,
    rate: float,
    paired: int,
    split: int,
    max_tokens: int,
    seed: int,
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    async def one(session, phase: str, block: int, arm: str, prompt, index: int) -> None:
        url, model = arms[arm]
        record = await send(
            session,
            url + "/v1/chat/completions",
            _body(model, prompt.prompt, min(prompt.max_tokens, max_tokens)),
            prompt.id,
            t0,
        )
        rows.append({"phase": phase, "block": block, "arm": arm, "index": index} | _row(record))

    pending: set[asyncio.Task] = set()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for index in range(paired + split):
            prompt = prompts[index % len(prompts)]
            if index < paired:
                block = min(index * len(ORDER) // paired, len(ORDER) - 1)
                first = ORDER[block]
                order = (first, "B" if first == "A" else "A")
                for arm in order:
                    pending.add(
                        asyncio.ensure_future(one(session, "paired", block, arm, prompt, index))
                    )
            else:
                arm = rng.choice("AB")
                pending.add(asyncio.ensure_future(one(session, "split", 0, arm, prompt, index)))
            pending = {t for t in pending if not t.done()}
            if (index + 1) % 50 == 0:
                print(f"  {index + 1}/{paired + split} arrivals sent", flush=True)
            await asyncio.sleep(rng.expovariate(rate))
        if pending:
            await asyncio.wait(pending)
    return rows


def _row(record: RequestRecord) -> dict[str, Any]:
    return {
        "prompt_id": record.prompt_id,
        "start_s": round(record.start, 4),
        "ok": record.ok,
        "error": record.error,
        "ttft_s": record.ttft,
        "tpot_s": record.tpot,
        "e2e_s": record.latency,
        "prompt_tokens": record.prompt_tokens,
        "output_tokens": record.output_tokens,
        "text": record.text,
    }


def _record(row: dict[str, Any]) -> RequestRecord:
    """A request back from its row, for the figures."""
    tpot, tokens = row["tpot_s"], row["output_tokens"]
    itl = [tpot] * (tokens - 1) if tpot is not None and tokens > 1 else []
    return RequestRecord(
        prompt_id=row["prompt_id"],
        start=row["start_s"],
        ttft=row["ttft_s"],
        latency=row["e2e_s"],
        itl=itl,
        output_tokens=tokens,
        error=row["error"],
        text=row["text"],
    )


def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The paired and split figures of the recorded rows."""
    by_pair: dict[int, dict[str, RequestRecord]] = {}
    for row in rows:
        if row["phase"] == "paired":
            by_pair.setdefault(row["index"], {})[row["arm"]] = _record(row)
    pairs = [(p["A"], p["B"]) for p in by_pair.values() if len(p) == 2 and p["A"].ok and p["B"].ok]
    split = [r for r in rows if r["phase"] == "split" and r["ok"]]
    errors = {arm: sum(not r["ok"] for r in rows if r["arm"] == arm) for arm in "AB"}
    return {
        "errors": errors,
        "paired": paired_figures(pairs),
        "split": split_figures(
            [_record(r) for r in split if r["arm"] == "A"],
            [_record(r) for r in split if r["arm"] == "B"],
        ),
    }


def paired_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paired phase as the canary simulation reads it: per arrival, each engine's (TTFT,
    TPOT, e2e) seconds, where both answered with all three."""
    by_index: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["phase"] == "paired" and row["ok"]:
            by_index.setdefault(row["index"], {})[row["arm"]] = row
    out = []
    for index, arms in sorted(by_index.items()):
        sides = [[arms[a].get(f"{m}_s") for m in METRICS] for a in "AB" if a in arms]
        if len(sides) == 2 and all(v for side in sides for v in side):
            out.append({"index": index, "A": sides[0], "B": sides[1]})
    return out


def markdown(result: dict[str, Any]) -> str:
    def ci(v: list[float]) -> str:
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    lines = [
        f"# B ({result['arms']['B']}) against A ({result['arms']['A']})",
        "",
        f"{result['rate']} requests/s; errors A {result['errors']['A']}, B {result['errors']['B']}",
        "",
        "| phase | metric | n | median ratio B/A [95%] | geometric-mean ratio B/A [95%] |",
        "|---|---|---|---|---|",
    ]
    for phase in ("paired", "split"):
        for metric in METRICS:
            f = result[phase].get(metric)
            if f:
                lines.append(
                    f"| {phase} | {metric} | {f['n']} | {ci(f['median_ratio'])} | "
                    f"{ci(f['geometric_mean_ratio'])} |"
                )
    if answers := result["paired"].get("answers"):
        lines += [
            "",
            f"Answers ({answers['scored']} pairs): {answers['identical']:.0%} identical, median "
            f"token agreement {answers['median_token_agreement']:.2f}, "
            f"{answers['degraded']:.0%} degraded under the default quality bounds.",
        ]
    return "\n".join(lines) + "\n"


def run(
    a: str, b: str, rate: float, paired: int, split: int, max_tokens: int, seed: int, out: Path
) -> dict[str, Any]:
    """Measure, write samples.jsonl, arms.json and arms.md under `out`, print the table."""
    arms = {}
    for name, spec in (("A", a), ("B", b)):
        url, sep, model = spec.rpartition("=")
        if not sep or not url.startswith("http"):
            raise ValueError(f"--{name.lower()} {spec!r}: give URL=MODEL, e.g. http://h:8001=smol")
        arms[name] = (url.rstrip("/"), model)
    prompts = pick_prompts(load_prompts(PROMPTS, max_tokens=max_tokens), paired + split, seed)
    started = time.time()
    rows = asyncio.run(_run(arms, prompts, rate, paired, split, max_tokens, seed))
    out.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r["index"], r["arm"]))
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for row in paired_rows(rows):
            f.write(json.dumps(row) + "\n")
    result = {
        "arms": {k: f"{m} at {u}" for k, (u, m) in arms.items()},
        "rate": rate,
        "started": started,
        "seconds": round(time.time() - started, 1),
        **figures(rows),
    }
    (out / "arms.json").write_text(json.dumps(result, indent=2, default=_finite) + "\n")
    (out / "arms.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value
