"""The load generator checked against `vllm bench serve` on one vLLM serving the embedded model.

    slipway bench loadgen [--concurrency 1,4] [--num-prompts 64]   # part of `make bench`

Serves the bf16 weights a release left in $SLIPWAY_HOME/models/<model>/bf16/weights, or, before
any release, pulls the model config's source (the embedded GGUF: no Hub) into
$SLIPWAY_HOME/bench/loadgen-model first. Runs both tools level by level on the same prompts (see
evaluation.benchmarks.vllm_bench.compare_with_vllm_bench), stops vLLM, and writes
$SLIPWAY_HOME/bench/loadgen.json with the comparison files (markdown, TTFT distributions plot) in
bench/loadgen-compare/. Takes about 12 minutes at the defaults on a 2-core CPU; `make bench` marks
a disagreement as a missed target.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click

from configs.evaluation import LoadProfile
from configs.home import Home
from configs.loader import load_yaml
from configs.models import ModelConfig
from evaluation.benchmarks.vllm_bench import compare_with_vllm_bench
from serving.vllm import VLLMServer
from tasks.hub import pull
from tasks.store import Store

SERVED = "bench"


def weights(config: ModelConfig, home: Home) -> Path:
    """The release's bf16 weights, or (before any release) the embedded model pulled into the
    store the way the release pulls it."""
    store = Store(home, config.name)
    if (digest := store.label("bf16")) and store.entry(digest).exists():
        return store.entry(digest).weights
    click.echo(f"[bench] no release of {config.name} yet: pulling {config.source}")
    entry, _ = pull(config.source, store, home, config.allow_pickle)
    return entry.weights


def run(config: Path, concurrency: list[int], num_prompts: int, tolerance: float) -> None:
    """Run the load generator and `vllm bench serve` side by side; write bench/loadgen.json."""
    home = Home.from_env()
    model = load_yaml(config, ModelConfig)
    model_dir = weights(model, home)
    profile = LoadProfile(
        mode="sweep",
        concurrency=concurrency,
        num_prompts=num_prompts,
    )
    out = home.root / "bench" / "loadgen-compare"
    shutil.rmtree(out, ignore_errors=True)  # every file there comes from this run
    with VLLMServer(model_dir, SERVED, home) as server:
        comparison = compare_with_vllm_bench(
            server.url, SERVED, model_dir, profile, out, tolerance=tolerance
        )
    report = {
        "model": model.name,
        "weights": str(model_dir),
        "num_prompts": num_prompts,
        "output_tokens": profile.max_tokens or 64,
        "load_average_1m": round(os.getloadavg()[0], 2),
        # The per-request TTFTs stay in comparison.json beside the plots.
        **comparison.model_dump(
            exclude={"levels": {"__all__": {"ours_ttfts_ms", "bench_ttfts_ms"}}}
        ),
        "files": str(out),
    }
    result = home.root / "bench" / "loadgen.json"
    result.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(comparison.markdown())
    click.echo(f"written to {result}; plots and per-request figures in {out}")
