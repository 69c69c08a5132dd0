"""One benchmark report: run every benchmark that fits a CPU machine and gather its figures.

    slipway bench [--reuse NAME ...]     # `make bench`

Runs, one after the other, each in its own process (`slipway bench NAME`, from
evaluation.benchmarks.NAME), so that a failure is reported, not fatal:
  gateway   added latency, requests/s per core, CPU per chunk, vs LiteLLM
  canary    requests and seconds to roll back a bad canary; false rollbacks
  gates     the release gate's false-pass rate at its margin, per suite size
  signing   sign/verify throughput as a share of sha256 x cores
  drift     drift check time and peak memory at 1M rows
  loadgen   the load generator vs `vllm bench serve` on one vLLM (~12 min)
then reads the last release flow run from Prefect (evaluation.benchmarks.release_stages). Each
benchmark's JSON becomes figures in evaluation.benchmarks.figures.
`--reuse NAME` takes that benchmark's JSON from an earlier run instead (stated in the report).
Writes $SLIPWAY_HOME/bench/report.md and report.json; every figure carries its method and target.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import click

from configs.home import REPO, Home
from evaluation.benchmarks.figures import FIGURES, Figure, release_figures
from evaluation.benchmarks.release_stages import release_stages

CLI = [sys.executable, "-m", "flows.cli", "bench"]
BENCHES = {
    "gateway": [*CLI, "gateway"],
    "canary": [*CLI, "canary", "--runs", "1000"],
    "gates": [*CLI, "gates"],
    "signing": [*CLI, "signing"],
    "drift": [*CLI, "drift"],
    "loadgen": [*CLI, "loadgen"],
}


def run_bench(name: str, out: Path, reuse: bool) -> dict:
    """The benchmark's JSON, fresh or reused; {"status": ...} says which or why there is none."""
    result = out / f"{name}.json"
    if reuse:
        if not result.is_file():
            return {"status": f"skipped: --reuse {name} given but {result} does not exist"}
        stamp = datetime.fromtimestamp(result.stat().st_mtime, UTC).isoformat(timespec="seconds")
        return {"status": f"reused from {stamp}", "data": json.loads(result.read_text())}
    click.echo(f"[bench] {name}: {' '.join(BENCHES[name][1:])}")
    started = time.perf_counter()
    before = result.stat().st_mtime if result.is_file() else None
    done = subprocess.run(BENCHES[name], cwd=REPO, capture_output=True, text=True, check=False)
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0 or not result.is_file() or result.stat().st_mtime == before:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"status": f"failed (exit {done.returncode}) after {seconds} s: " + " | ".join(tail)}
    return {"status": f"ran in {seconds} s", "data": json.loads(result.read_text())}


def markdown(sections: dict[str, str], figures: list[Figure], generated: str) -> str:
    lines = [
        f"# Slipway benchmark report\n\n{generated}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at the end. Ratios are measured side by side in one run.\n"
    ]
    for bench, status in sections.items():
        lines.append(f"## {bench}\n\n{status}\n")
        rows = [f for f in figures if f.bench == bench]
        if not rows:
            continue
        lines += ["| figure | value | unit | target | met |", "|---|---|---|---|---|"]
        for f in rows:
            met = {True: "yes", False: "**no**", None: ""}[f.meets]
            lines.append(f"| {f.name} | {f.value} | {f.unit} | {f.target} | {met} |")
        methods = dict.fromkeys(f.method for f in rows)
        lines.append("\nMethod: " + "\n\nMethod: ".join(methods) + "\n")
    return "\n".join(lines)


def run(reuse: tuple[str, ...]) -> None:
    """Run every CPU benchmark and write bench/report.md and report.json."""
    home = Home.from_env()
    out = home.root / "bench"
    out.mkdir(parents=True, exist_ok=True)
    sections: dict[str, str] = {}
    figures: list[Figure] = []
    raw: dict[str, dict] = {}
    for name in BENCHES:
        result = run_bench(name, out, name in reuse)
        sections[name], raw[name] = result["status"], result.get("data", {})
        if "data" in result:
            figures += FIGURES[name](result["data"])
    try:
        release = asyncio.run(release_stages(home))
    except Exception as e:  # no Prefect database or server to ask: say so, the rest still stands
        release = {"status": f"skipped: could not read the release runs from Prefect: {e}"}
    sections["release"], raw["release"] = release.pop("status"), release
    if release:
        figures += release_figures({"status": sections["release"], **release})
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    report = {
        "generated": generated,
        "cpus": os.cpu_count(),
        "sections": sections,
        "figures": [asdict(f) for f in figures],
        "raw": raw,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(sections, figures, generated))
    missed = [
        f"{f.bench}: {f.name} = {f.value} (target {f.target})" for f in figures if f.meets is False
    ]
    click.echo((out / "report.md").read_text())
    click.echo(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    if missed:
        click.echo("targets missed:\n  " + "\n  ".join(missed))
