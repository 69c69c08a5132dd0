"""Benchmark of the drift check on a million requests per window, from the usage store up.

    slipway bench drift --rows 1000000 --out DIR

Writes two windows of synthetic traffic (evaluation.benchmarks.traffic; the current one with a
planted shift: latency and TTFT x1.3 and a different tenant mix) through the gateway's own
usage-log writer into a temporary SQLite file, then times the whole drift check on them: streaming
both windows from the store, exact counts, sampling, prompt descriptors and the Evidently report,
then rendering its HTML. Evidently's import is timed apart (a scheduled run pays it once). Peak
memory is the peak resident set (resource.getrusage ru_maxrss) of a fresh child process that only
imports and runs the check, so the writer's memory does not count. Prints the figures and writes
drift.json to DIR (default $SLIPWAY_HOME/bench), with the machine's load average: other work slows
every figure.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import resource
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from configs.drift import DriftConfig
from configs.home import Home
from evaluation.benchmarks.traffic import Traffic, synthetic_rows
from serving.gateway.usage import count_usage, iter_usage, write_rows


def _check(url: str, end: datetime, out: multiprocessing.Queue) -> None:
    """In a fresh process: time the drift check and its HTML, report peak RSS."""
    begin = time.perf_counter()
    # Imported here to be timed apart: a scheduled flow pays the import once per run.
    importlib.import_module("evidently.presets")
    from evaluation.monitoring.drift import check, windows

    imported = time.perf_counter() - begin
    begin = time.perf_counter()
    current, reference = windows(end, 1, "previous_week")
    result, snapshot = check(
        current, reference, url, DriftConfig(), count=count_usage, read=iter_usage
    )
    checked = time.perf_counter() - begin
    html = snapshot.get_html_str(as_iframe=False)
    out.put(
        {
            "import_s": round(imported, 2),
            "check_s": round(checked, 2),
            "check_and_html_s": round(time.perf_counter() - begin, 2),
            "html_bytes": len(html),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "drift_share": result.drift_share,
            "drifted": result.drifted,
            "rows": [result.current.rows, result.reference.rows],
            "sampled": [result.current.sampled, result.reference.sampled],
        }
    )


def run(rows: int, out: Path | None) -> None:
    end = datetime(2026, 1, 15, 12, tzinfo=UTC)
    shifted = Traffic(mix=(0.3, 0.3, 0.4), latency_median_ms=800 * 1.3, ttft_median_ms=150 * 1.3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gateway-usage.sqlite"
        url = f"sqlite:///{path}"
        begin = time.perf_counter()
        for start, traffic, seed in (
            (end - timedelta(days=7, hours=1), Traffic(), 1),
            (end - timedelta(hours=1), shifted, 2),
        ):
            write_rows(url, synthetic_rows(rows, start, 3600, traffic, seed))
        written = time.perf_counter() - begin
        # spawn: a fresh interpreter, so peak RSS is the check's own (imports included).
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_check, args=(url, end, queue))
        child.start()
        figures = queue.get()
        child.join()
        store_mb = round(path.stat().st_size / 1e6, 1)
    report = {
        "rows_per_window": rows,
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine slows it
        "sample_rows": DriftConfig().sample_rows,
        "write_s": round(written, 1),
        "store_mb": store_mb,
        **figures,
        "peak_rss_method": "resource.getrusage(RUSAGE_SELF).ru_maxrss of a spawned process "
        "that runs only the check (imports of pandas, numpy, evidently included)",
        "timed": "windows streamed from SQLite (7 of 15 columns), exact counts over all rows, "
        "seeded sample, prompt descriptors, Evidently DataDriftPreset; then its HTML",
    }
    out = out or Home.from_env().root / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo(json.dumps(report, indent=2))
    click.echo(f"wrote {out / 'drift.json'}")
