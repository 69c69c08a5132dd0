"""Benchmark model signing and verification against the machine's own sha256 speed.

    python -m evaluation.benchmarks.signing [--size-gb 1.0] [--files 8] [--rounds 3]

A model directory of --files safetensors-sized shards (random bytes, --size-gb in all) plus the
small files a model has is generated once under $SLIPWAY_HOME/cache/bench-signing and kept (in the
page cache after the first round, so the disk is not what is measured). Each round measures, side
by side because the machine is noisy: hashlib sha256 on one core over an in-memory buffer (the
machine's rate; times the cores is the ideal), Slipway's sign and verify (tasks.signing, the code
the release flow runs), and the parallel hashlib pass over the same files (tasks.hub.hash_dir).
Figures are medians over the rounds; the target is sign and verify at >= 0.8 of the ideal.
Writes $SLIPWAY_HOME/bench/signing.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import click

from configs.home import Home
from configs.models import Signing

TARGET_RATIO = 0.8
SMALL_FILES = {
    "config.json": b"{}",
    "tokenizer.json": b"{}",
    "generation_config.json": b"{}",
    "LICENSE": b"x",
}


def make_model(root: Path, size_bytes: int, files: int) -> Path:
    """The generated model directory; rebuilt only when its shape differs from the one asked for."""
    weights = root / "weights"
    shard = size_bytes // files
    names = [f"model-{i + 1:05d}-of-{files:05d}.safetensors" for i in range(files)]
    if (
        weights.is_dir()
        and sorted(p.name for p in weights.glob("*.safetensors")) == names
        and all((weights / n).stat().st_size == shard for n in names)
    ):
        return weights
    if weights.exists():
        for p in weights.iterdir():
            p.unlink()
    weights.mkdir(parents=True, exist_ok=True)
    block = 64 << 20
    for name in names:
        with (weights / name).open("wb") as f:
            left = shard
            while left:
                n = min(block, left)
                f.write(os.urandom(n))
                left -= n
    for name, data in SMALL_FILES.items():
        (weights / name).write_bytes(data)
    return weights


def sha256_one_core(buffer: bytes) -> float:
    """Bytes per second of hashlib sha256 on one core, over memory."""
    start = time.perf_counter()
    hashlib.sha256(buffer).digest()
    return len(buffer) / (time.perf_counter() - start)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(size_gb: float, files: int, rounds: int, home: Home) -> dict:
    from tasks.hub import hash_dir
    from tasks.signing import keygen, sign, verify

    keygen(home)
    weights = make_model(home.cache / "bench-signing", int(size_gb * 1e9), files)
    total = sum(p.stat().st_size for p in weights.iterdir())
    cores = os.cpu_count() or 1
    buffer = os.urandom(256 << 20)
    config = Signing()
    samples: dict[str, list[float]] = {"sha256_core": [], "sign": [], "verify": [], "hash_dir": []}
    hash_dir(weights)  # warm the page cache: the disk is not what is measured
    for _ in range(rounds):
        samples["sha256_core"].append(sha256_one_core(buffer))
        samples["sign"].append(total / timed(lambda: sign(weights, config, home)))
        samples["verify"].append(total / timed(lambda: verify(weights, config, home)))
        samples["hash_dir"].append(total / timed(lambda: hash_dir(weights)))
    med = {k: statistics.median(v) for k, v in samples.items()}
    ideal = med["sha256_core"] * cores
    return {
        "bytes": total,
        "files": len(list(weights.iterdir())),
        "cores": cores,
        "rounds": rounds,
        "sha256_one_core_GBps": round(med["sha256_core"] / 1e9, 3),
        "ideal_GBps": round(ideal / 1e9, 3),
        "sign_GBps": round(med["sign"] / 1e9, 3),
        "verify_GBps": round(med["verify"] / 1e9, 3),
        "hashlib_parallel_GBps": round(med["hash_dir"] / 1e9, 3),
        "sign_ratio": round(med["sign"] / ideal, 3),
        "verify_ratio": round(med["verify"] / ideal, 3),
        "hashlib_parallel_ratio": round(med["hash_dir"] / ideal, 3),
        # What signing costs over the best this machine managed at the time, and how busy it was.
        "sign_over_hashlib_parallel": round(med["sign"] / med["hash_dir"], 3),
        "verify_over_hashlib_parallel": round(med["verify"] / med["hash_dir"], 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "target_ratio": TARGET_RATIO,
        "meets_target": med["sign"] / ideal >= TARGET_RATIO
        and med["verify"] / ideal >= TARGET_RATIO,
        "samples_GBps": {k: [round(x / 1e9, 3) for x in v] for k, v in samples.items()},
        "method": (
            f"{len(list(weights.iterdir()))} files, {total / 1e9:.2f} GB of random bytes in the "
            "page cache; "
            f"per round: hashlib sha256 on one core over 256 MiB in memory (x {cores} cores = "
            "ideal), "
            "tasks.signing.sign and .verify (model_signing, elliptic key, sha256 per file), "
            f"tasks.hub.hash_dir (hashlib in {cores} threads); medians of {rounds} rounds; "
            "ratio = throughput / ideal"
        ),
    }


def run(size_gb: float, files: int, rounds: int) -> None:
    """Signing and verification throughput as a share of sha256 x cores on this machine."""
    home = Home.from_env()
    report = measure(size_gb, files, rounds, home)
    out = home.root / "bench" / "signing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(json.dumps(report, indent=2))
    click.echo(f"written to {out}")
