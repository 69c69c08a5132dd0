"""The figures of each benchmark, read from its JSON: every one with its unit, its method and,
where Slipway sets one, its target and whether it was met.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.benchmarks.release_stages import MLFLOW_STAGES

OVERHEAD_TARGET = 0.05  # Prefect + MLflow share of the release flow's wall time
# The gateway beside the bare floor proxy, measured in the same round: its share of the floor's
# requests per core and the p99 it adds over the floor's, no worse than before the limits'
# reservations were added (0.57 to 0.64, and 0.5 to 0.7 ms, measured then).
FLOOR_FIGURES = (
    ("rps_per_core_ratio", "gateway / floor: requests/s per core", "x", ">= 0.57"),
    ("added_p99_ms_c1", "gateway over floor: added p99, concurrency 1", "ms", "<= 0.7"),
    ("cpu_us_per_request", "gateway over floor: CPU per request", "µs", ""),
)


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


def gateway_figures(d: dict) -> list[Figure]:
    setup = d.get("setup", {})
    how = (
        f"wrk against a mock upstream on loopback, {setup.get('layout', '')}, "
        f"{setup.get('duration_s', '?')} s per run, median of {setup.get('repeats', 1)} "
        "interleaved rounds; added = minus going direct"
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
    spread = d.get("spread", {})

    def within(side: str, key: str) -> str:
        r = spread.get(side, {}).get(key)
        return f"; each round's own, range {r['min']:g} to {r['max']:g}" if r else ""

    over_floor = d.get("gateway_over_floor", {})
    for key, label, unit, target in FLOOR_FIGURES:
        if key in over_floor:
            out.append(
                figure(
                    "gateway",
                    label,
                    over_floor[key],
                    unit,
                    how + within("gateway_over_floor", key),
                    target,
                )
            )
    for key, value in d.get("litellm_over_gateway", {}).items():
        out.append(
            figure(
                "gateway",
                f"LiteLLM / gateway: {key}",
                value,
                "x",
                how + "; same round, same upstream" + within("litellm_over_gateway", key),
            )
        )
    if "skipped" in d.get("litellm", {}) or "error" in d.get("litellm", {}):
        out.append(figure("gateway", "LiteLLM comparison", str(d["litellm"]), "", how))
    return out


def canary_figures(d: dict) -> list[Figure]:
    how = (
        f"{d['runs']} simulated rollouts per scenario, {d['traffic']['rate']:g} req/s, "
        f"seed {d['seed']}, "
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


def gates_figures(d: dict) -> list[Figure]:
    how = (
        f"{d['seeds']} simulated suites per variant, {len(d['variants_at_margin'])} variants whose "
        f"loss is exactly the {d['margin']:.0%} margin (pooled; Wilson 95% interval), judged by "
        "the release gate's paired score test"
    )
    out = []
    for size in d["sizes"]:
        low, high = size["interval_95"]
        out.append(
            figure(
                "gates",
                f"false-pass rate at the margin, {size['items']} items",
                size["false_pass_rate"],
                f"share (95%: {low:g} to {high:g})",
                how,
                f"<= {d['alpha']}",
            )
        )
        out.append(
            figure(
                "gates",
                f"an identical variant passes, {size['items']} items",
                size["identical_pass_rate"],
                "share",
                how.split(",")[0] + ", a base right on 60% of the items and no flips",
            )
        )
    return out


def drift_figures(d: dict) -> list[Figure]:
    how = d.get("timed", "") + (
        f"; peak memory: {d['peak_rss_method']}" if "peak_rss_method" in d else ""
    )
    return [
        figure("drift", key, value, _unit(key), how)
        for key, value in d.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ] + alarm_figures(d.get("alarm_budget") or {})


def alarm_figures(a: dict) -> list[Figure]:
    """The simulated false alarms: the upper 95% bound of each family-wise rate (the rule's
    against the configured rate), and the looks a planted shift took."""
    if not a:
        return []
    how = (
        f"simulated weeks of {a['horizon_looks']} hourly looks at every feature on stationary "
        "synthetic traffic; the drift check's own decision rule on the statistics (no Evidently); "
        "upper bound of the 95% Clopper-Pearson interval over the horizons"
    )
    out = []
    for case in a["false_alarms"]:
        n = case["requests_per_window"]
        for key, r in case["family_wise"].items():
            lo, hi = r["ci95"]
            target = f"<= {a['false_alarm_rate']}" if key.startswith("rule") else ""
            name = f"false alarms, {key}, {n} req/window: {r['rate']} ({lo}-{hi})"
            out.append(figure("drift", name, hi, "share, upper 95%", how, target))
    for case in a["planted_shift"]:
        for key in ("latency_ms", "alarm"):
            r, n = case[key], case["requests_per_window"]
            lo, hi = r["caught_within_horizon"]["ci95"]
            name = (
                f"planted shift, {n} req/window, {key}: looks to catch, median (p90 "
                f"{r['looks_p90']}; caught in {r['caught_within_horizon']['rate']} ({lo}-{hi}))"
            )
            out.append(figure("drift", name, r["looks_median"], "looks", case["shift"]))
    return out


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


def release_figures(d: dict) -> list[Figure]:
    how = (
        f"{d['status']}: task run times from the Prefect API (sum per stage); Prefect overhead "
        "= flow wall time minus all task run time; MLflow = the time of "
        + ", ".join(sorted(MLFLOW_STAGES))
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


# Each benchmark's figures, by the name report.BENCHES runs it under.
FIGURES = {
    "gateway": gateway_figures,
    "canary": canary_figures,
    "gates": gates_figures,
    "signing": signing_figures,
    "drift": drift_figures,
    "loadgen": loadgen_figures,
}
