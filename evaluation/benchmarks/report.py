"""One benchmark report: run every benchmark that fits a CPU machine and gather its figures.

    slipway bench [--reuse NAME ...]     # `make bench`

Runs, one after the other (each in its own process, so a failure is reported, not fatal):
  gateway   evaluation/bench_gateway.py: added latency, requests/s per core, CPU per chunk, vs LiteLLM
  canary    evaluation.benchmarks.canary: requests and seconds to roll back a bad canary; false rollbacks
  signing   evaluation.benchmarks.signing: sign/verify throughput as a share of sha256 x cores
  drift     evaluation.benchmarks.drift (when present): drift check time and peak memory at 1M rows
  loadgen   evaluation.benchmarks.loadgen: the load generator vs `vllm bench serve` on one vLLM (~12 min)
then reads the last release flow run from Prefect: wall time per stage, and the share of the flow's
wall time spent outside the stages' own work (Prefect orchestration and MLflow calls).
`--reuse NAME` takes that benchmark's JSON from an earlier run instead (stated in the report).
Writes $SLIPWAY_HOME/bench/report.md and report.json; every figure carries its method and target.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

from configs.home import REPO, Home

CLI = [sys.executable, "-m", "flows.cli", "bench"]
BENCHES = {
    "gateway": [*CLI, "gateway"],
    "canary": [*CLI, "canary", "--runs", "1000"],
    "signing": [*CLI, "signing"],
    "drift": [*CLI, "drift"],
    "loadgen": [*CLI, "loadgen"],
}
# Stages whose work is MLflow calls: their time counts as MLflow overhead, not as the stage's work.
MLFLOW_STAGES = {"register", "find-registered", "first-champion", "log-evaluation"}
OVERHEAD_TARGET = 0.05


@dataclass(frozen=True)
class Figure:
    bench: str
    name: str
    value: float | str | None
    unit: str
    target: str  # e.g. ">= 0.8"; "" when the issue sets none
    meets: bool | None
    method: str


def check(value: float | None, target: str) -> bool | None:
    if value is None or not target:
        return None
    op, bound = target.split()
    return value >= float(bound) if op == ">=" else value <= float(bound)


def figure(bench: str, name: str, value, unit: str, method: str, target: str = "") -> Figure:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    return Figure(bench, name, value, unit, target, check(number, target), method)


# ---- running the benchmarks ----------------------------------------------------------------------


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
    done = subprocess.run(BENCHES[name], cwd=REPO, capture_output=True, text=True)
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0 or not result.is_file() or result.stat().st_mtime == before:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"status": f"failed (exit {done.returncode}) after {seconds} s: " + " | ".join(tail)}
    return {"status": f"ran in {seconds} s", "data": json.loads(result.read_text())}


# ---- figures per benchmark -----------------------------------------------------------------------


def gateway_figures(d: dict) -> list[Figure]:
    setup = d.get("setup", {})
    how = (
        f"wrk against a mock upstream on loopback, {setup.get('layout', '')}, "
        f"{setup.get('duration_s', '?')} s per run; added = minus going direct"
    )
    gw, targets = d["gateway"], d.get("targets", {})
    out = [
        figure("gateway", "added latency p50, concurrency 1", gw["added_p50_ms_c1"], "ms", how),
        figure(
            "gateway",
            "added latency p99, concurrency 1",
            gw["added_p99_ms_c1"],
            "ms",
            how,
            f"<= {targets.get('added_p99_ms_c1', 1.0)}",
        ),
        figure(
            "gateway",
            "requests/s per core at saturation",
            gw["rps_per_core"],
            "req/s",
            how + "; requests / CPU-seconds of the gateway process (c32)",
            f">= {targets.get('rps_per_core', 3000)}",
        ),
        figure(
            "gateway",
            "CPU per streamed chunk (c16)",
            gw["cpu_us_per_chunk_c16"],
            "µs",
            how,
            f"<= {targets.get('cpu_us_per_chunk', 30)}",
        ),
        figure(
            "gateway",
            "added time to first chunk",
            gw["added_first_chunk_ms"],
            "ms",
            how + "; median of 200",
        ),
    ]
    for key, value in d.get("litellm_over_gateway", {}).items():
        out.append(
            figure(
                "gateway",
                f"LiteLLM / gateway: {key}",
                value,
                "x",
                how + "; same run, same upstream",
            )
        )
    if "skipped" in d.get("litellm", {}) or "error" in d.get("litellm", {}):
        out.append(figure("gateway", "LiteLLM comparison", str(d["litellm"]), "", how))
    return out


def canary_figures(d: dict) -> list[Figure]:
    how = (
        f"{d['runs']} simulated rollouts per scenario, {d['traffic']['rate']:g} req/s, seed {d['seed']}, "
        "the rollout policy's own analysis functions vs a Flagger-like static analysis"
    )
    out = []
    for r in d["results"]:
        label = f"{r['method']}, {r['scenario']}"
        aa = r["scenario"] == "A/A"
        # Targets are Slipway's; Flagger's analysis runs beside it for comparison only.
        target = ("<= 0.05" if aa else ">= 0.95") if r["method"] == "slipway" else ""
        out.append(
            figure("canary", f"{label}: rolled back", r["rollback_rate"], "share", how, target)
        )
        if r["rollback_seconds"] and not aa:
            out.append(
                figure(
                    "canary",
                    f"{label}: seconds to roll back (median)",
                    round(r["rollback_seconds"][0], 1),
                    "s",
                    how,
                )
            )
    return out


def signing_figures(d: dict) -> list[Figure]:
    how = d["method"] + f"; load average {d.get('load_average_1m', '?')} on {d['cores']} cores"
    target = f">= {d['target_ratio']}"
    return [
        figure(
            "signing", "sign throughput / (sha256 x cores)", d["sign_ratio"], "ratio", how, target
        ),
        figure(
            "signing",
            "verify throughput / (sha256 x cores)",
            d["verify_ratio"],
            "ratio",
            how,
            target,
        ),
        figure("signing", "sign throughput", d["sign_GBps"], "GB/s", how),
        figure("signing", "verify throughput", d["verify_GBps"], "GB/s", how),
        figure("signing", "sha256 x cores (ideal)", d["ideal_GBps"], "GB/s", how),
        figure(
            "signing",
            "parallel hashlib / ideal (what the machine gave)",
            d["hashlib_parallel_ratio"],
            "ratio",
            how,
        ),
    ]


def drift_figures(d: dict) -> list[Figure]:
    how = d.get("timed", "") + (
        f"; peak memory: {d['peak_rss_method']}" if "peak_rss_method" in d else ""
    )
    return [
        figure("drift", key, value, _unit(key), how)
        for key, value in d.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def loadgen_figures(d: dict) -> list[Figure]:
    how = (
        f"{d['model']} bf16 on vLLM; `vllm bench serve` and the load generator on the same "
        f"{d['num_prompts']} x concurrency prompts in the same order, run A-B-B-A in halves, "
        f"{d['output_tokens']} output tokens each; load average {d['load_average_1m']}"
    )
    target = f"<= {d['tolerance']}"
    out = []
    for x in d["levels"]:
        rows = [
            ("output tok/s difference, absolute", abs(x["throughput_diff"]), "share", target),
            ("median TTFT difference, absolute", abs(x["ttft_diff"]), "share", target),
            ("output tok/s, ours", x["ours_output_tokens_per_s"], "tok/s", ""),
            ("output tok/s, vllm bench", x["bench_output_tokens_per_s"], "tok/s", ""),
            ("median TTFT, ours", x["ours_ttft_p50_ms"], "ms", ""),
            ("median TTFT, vllm bench", x["bench_ttft_p50_ms"], "ms", ""),
            ("same prompt, median of ours - vllm bench TTFT", x["paired_ttft_diff_ms"], "ms", ""),
        ]
        out += [
            figure(
                "loadgen",
                f"c{x['concurrency']}: {name}",
                round(value, 4 if unit == "share" else 2),
                unit,
                how,
                bound,
            )
            for name, value, unit, bound in rows
        ]
    return out


def _unit(key: str) -> str:
    for suffix, unit in (
        ("_s", "s"),
        ("_mb", "MB"),
        ("_ms", "ms"),
        ("_rows", "rows"),
        ("_window", "rows"),
    ):
        if key.endswith(suffix):
            return unit
    return ""


# ---- the release flow's stages, from Prefect -----------------------------------------------------


async def release_stages(home: Home) -> dict:
    """Stage wall times of the last completed release flow run, and the overhead share."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    database = settings.server.database.connection_url.get_secret_value()
    local = database.removeprefix("sqlite+aiosqlite:///")
    if settings.api.url is None and local != database and not Path(local).is_file():
        return {
            "status": f"skipped: no Prefect database at {local} (PREFECT_HOME): run `make demo` first"
        }
    async with get_client() as client:
        [last, *_] = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["release"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["COMPLETED"]))
            ),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        ) or [None]
        if last is None:
            return {
                "status": "skipped: no completed release flow run in Prefect; run `make demo` first"
            }
        runs, frontier = [last], [last.id]
        while frontier:  # subflows (release-variant), any depth
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
                )
            )
            runs += children
            frontier = [c.id for c in children]
        ids = [r.id for r in runs]
        tasks = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids))
        )
    wrappers = {r.parent_task_run_id for r in runs}  # the task runs standing for subflows
    stages: dict[str, float] = {}
    for t in tasks:
        if t.id in wrappers:
            continue
        stage = re.sub(r"-[0-9a-f]{3}$", "", t.name)  # Prefect names a task run <task>-<3 hex>
        stages[stage] = stages.get(stage, 0.0) + t.total_run_time.total_seconds()
    wall = (last.end_time - last.start_time).total_seconds()
    mlflow = sum(s for name, s in stages.items() if name in MLFLOW_STAGES)
    prefect = wall - sum(stages.values())
    return {
        "status": f"flow run {last.name} ({last.id}) of {last.start_time.isoformat(timespec='seconds')}",
        "wall_s": round(wall, 1),
        "stages_s": {k: round(v, 2) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])},
        "prefect_overhead_s": round(prefect, 2),
        "mlflow_s": round(mlflow, 2),
        "overhead_share": round((prefect + mlflow) / wall, 4) if wall else None,
    }


def release_figures(d: dict) -> list[Figure]:
    how = (
        f"{d['status']}: task run times from the Prefect API (sum per stage); Prefect overhead = flow "
        f"wall time minus all task run time; MLflow = the time of {', '.join(sorted(MLFLOW_STAGES))}"
    )
    out = [figure("release", "flow wall time", d["wall_s"], "s", how)]
    out += [figure("release", f"stage {name}", s, "s", how) for name, s in d["stages_s"].items()]
    out += [
        figure("release", "Prefect overhead", d["prefect_overhead_s"], "s", how),
        figure("release", "MLflow calls", d["mlflow_s"], "s", how),
        figure(
            "release",
            "Prefect + MLflow share of wall time",
            d["overhead_share"],
            "share",
            how,
            f"<= {OVERHEAD_TARGET}",
        ),
    ]
    return out


# ---- the report ----------------------------------------------------------------------------------

FIGURES = {
    "gateway": gateway_figures,
    "canary": canary_figures,
    "signing": signing_figures,
    "drift": drift_figures,
    "loadgen": loadgen_figures,
}


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
