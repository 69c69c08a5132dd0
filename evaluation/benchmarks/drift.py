"""Benchmark of the drift check: its false alarms over a week of hourly looks, simulated, and its
time on a million requests per window, from the usage store up.

    slipway bench drift --rows 1000000 --horizons 1000 --out DIR

False alarms (simulate): the decision rule (evaluation/monitoring/drift_rule.py) applied, with the
check's own functions, to the statistics of simulated looks: each horizon is `horizon_looks`
hourly looks (168: a week), each look two independent windows of stationary synthetic traffic
(the distributions of evaluation.benchmarks.traffic; both windows alike) of `n` requests, every
feature with at least `min_rows` values in both compared, as the check does. Reported per window
size, with 95% Clopper-Pearson intervals over the horizons: the family-wise false-alarm rate (a
horizon with any feature flagged at any look) of the rule as configured, of its tests alone (the
budget, without the floors), of the old rule (a distance at 0.1, the error rate's z-test at
p < 0.001, at every look), and of the drift-share alarm; per feature kind too. Then a planted
shift (latency x1.3 from the second day on, TTFT too) and the looks it took to be flagged. The
Evidently report is not run here: tests/evaluation/test_drift.py checks once that these
statistics equal what it computes on the same data.


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
import numpy as np

from configs.drift import DriftConfig
from configs.home import Home
from evaluation.benchmarks.traffic import Traffic, synthetic_rows
from evaluation.monitoring import drift_rule as rule
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


NUMBERS = (
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "ttft_ms",
    "prompt_chars",
    "prompt_words",
    "prompt_sentences",
)
OLD_RULE = {"distance": 0.1, "error_p": 0.001}  # configs/drift.yaml before the alarm budget
WINDOW_SIZES = (100, 1000)  # requests per window: min_rows (the floors help least), and more
# The timing benchmark's planted shift: latency and TTFT x1.3 (a KS distance of about 0.2 each)
# and a different tenant mix, three features of up to nine: 30%, the drift share that alarms.
SHIFT = Traffic(mix=(0.3, 0.3, 0.4), latency_median_ms=800 * 1.3, ttft_median_ms=150 * 1.3)
SHIFT_LABEL = "latency and TTFT medians x1.3, tenant mix 60/30/10% -> 30/30/40%"
SHIFT_FROM = 24  # the planted shift starts at the second day's first look
_VALUES_PER_BLOCK = 1_000_000  # requests per window x looks simulated at once: ~0.5 GB
_MEAN_WORD_CHARS, _SD_WORD_CHARS = 5.0, 1.55  # of traffic._WORDS; a space or "?" each


def window_features(
    rng: np.random.Generator, looks: int, n: int, traffic: Traffic
) -> dict[str, np.ndarray]:
    """`looks` windows of `n` requests each: the compared features (looks x n; NaN where the
    check has no value), drawn as evaluation.benchmarks.traffic.synthetic_rows draws them (prompt
    characters from the word count, one sentence per prompt)."""
    shape = (looks, n)
    tenant = rng.choice(len(traffic.tenants), size=shape, p=traffic.mix)
    words = rng.poisson(traffic.prompt_words - 1, shape) + 1.0
    error = rng.random(shape) < traffic.error_rate
    stream = rng.random(shape) < traffic.stream_share
    logged = np.isin(tenant, [traffic.tenants.index(t) for t in traffic.logs_prompts])
    chars = np.rint(
        words * (_MEAN_WORD_CHARS + 1)
        + np.sqrt(words) * _SD_WORD_CHARS * rng.standard_normal(shape)
    )
    return {
        "prompt_tokens": words * 4 // 3 + 8,
        "completion_tokens": np.where(error, 0.0, rng.poisson(120, shape)),
        "latency_ms": rng.lognormal(np.log(traffic.latency_median_ms), 0.5, shape),
        "ttft_ms": np.where(
            stream, rng.lognormal(np.log(traffic.ttft_median_ms), 0.4, shape), np.nan
        ),
        "prompt_chars": np.where(logged, chars, np.nan),
        "prompt_words": np.where(logged, words, np.nan),
        "prompt_sentences": np.where(logged, 1.0, np.nan),
        "tenant": np.stack([(tenant == i).sum(axis=1) for i in range(len(traffic.tenants))], 1),
        "is_error": error.sum(axis=1),
    }


def flags(
    rng: np.random.Generator, looks: int, n: int, config: DriftConfig, current: Traffic
) -> dict[str, dict[str, np.ndarray]]:
    """Per feature, per look: flagged by the rule, by its test alone, by the old rule (all False
    where the feature is not compared), and whether it was compared."""
    ref, cur = window_features(rng, looks, n, Traffic()), window_features(rng, looks, n, current)
    stats, compared = {}, {}
    for name in NUMBERS:
        values = np.minimum(*(np.sum(~np.isnan(w[name]), axis=1) for w in (ref, cur)))
        compared[name] = values >= config.min_rows
        if compared[name].any():
            stats[name] = rule.numbers(ref[name], cur[name])
    compared["tenant"] = compared["is_error"] = np.ones(looks, dtype=bool)
    stats["tenant"] = rule.categories(ref["tenant"], cur["tenant"])
    stats["is_error"] = rule.proportions(ref["is_error"], n, cur["is_error"], n)
    k = sum(c.astype(int) for c in compared.values())
    level = config.false_alarm_rate / config.horizon_looks / k  # rule.feature_level, per look
    out = {}
    for name, s in stats.items():
        seen = compared[name]
        old = (
            (s.p_value < OLD_RULE["error_p"])
            if name == "is_error"
            else (s.effect >= OLD_RULE["distance"])
        )
        out[name] = {
            "rule": seen & rule.drifted(s, level, config.floor(name)),
            "test": seen & (s.p_value < level),
            "old": seen & old,
            "compared": seen,
        }
    return out


def _rate(hits: int, n: int) -> dict[str, float | int]:
    lo, hi = rule.clopper_pearson(hits, n)
    return {"rate": round(hits / n, 4), "ci95": [round(lo, 4), round(hi, 4)], "horizons": n}


KINDS = {"numbers": NUMBERS, "tenant": ("tenant",), "is_error": ("is_error",)}


def false_alarms(
    horizons: int, n: int, config: DriftConfig, seed: int, looks: int | None = None
) -> dict:
    """The family-wise false-alarm rates over `horizons` simulated horizons of stationary traffic
    of `looks` looks each (default: the configured horizon_looks), windows of `n` requests (a
    block of horizons at a time, in bounded memory)."""
    rng = np.random.default_rng(seed)
    looks = looks or config.horizon_looks
    block = max(1, _VALUES_PER_BLOCK // (looks * n))
    hit = {key: 0 for key in ("rule", "test", "old", "alarm", *(f"rule/{k}" for k in KINDS))}
    compared: dict[str, int] = {}
    for done in range(0, horizons, block):
        size = min(block, horizons - done)
        per = flags(rng, size * looks, n, config, Traffic())
        for name, f in per.items():
            compared[name] = compared.get(name, 0) + int(f["compared"].sum())
        for kind in ("rule", "test", "old"):
            hit[kind] += int(_any_look(per, kind, tuple(per), size, looks).sum())
        for kind, names in KINDS.items():
            hit[f"rule/{kind}"] += int(_any_look(per, "rule", names, size, looks).sum())
        drifted = sum(f["rule"].astype(int) for f in per.values())
        share = drifted / sum(f["compared"].astype(int) for f in per.values())
        hit["alarm"] += int((share >= config.drift_share).reshape(size, looks).any(axis=1).sum())
    total = horizons * looks
    return {
        "requests_per_window": n,
        "looks": looks,
        "features_compared": {k: round(v / total, 3) for k, v in compared.items() if v},
        "family_wise": {k: _rate(v, horizons) for k, v in hit.items()},
    }


def _any_look(per: dict, kind: str, names: tuple[str, ...], horizons: int, looks: int):
    """Per horizon: whether any of `names` was flagged by `kind` at any of its looks."""
    found = np.zeros(horizons * looks, dtype=bool)
    for name in names:
        if name in per:
            found |= per[name][kind]
    return found.reshape(horizons, looks).any(axis=1)


def planted_shift(runs: int, n: int, config: DriftConfig, seed: int) -> dict:
    """`runs` horizons in which SHIFT starts at look SHIFT_FROM: how many looks from the shift on
    (1: the first) it took until latency_ms was flagged, and until the drift alarm (a drift share
    of at least `drift_share`)."""
    rng = np.random.default_rng(seed)
    taken = {"latency_ms": np.full(runs, np.inf), "alarm": np.full(runs, np.inf)}
    for look in range(1, config.horizon_looks - SHIFT_FROM + 1):
        waiting = np.isinf(taken["latency_ms"]) | np.isinf(taken["alarm"])
        if not waiting.any():
            break
        per = flags(rng, int(waiting.sum()), n, config, SHIFT)
        share = sum(f["rule"].astype(int) for f in per.values()) / sum(
            f["compared"].astype(int) for f in per.values()
        )
        idx = np.flatnonzero(waiting)
        for key, hit in (
            ("latency_ms", per["latency_ms"]["rule"]),
            ("alarm", share >= config.drift_share),
        ):
            first = idx[hit & np.isinf(taken[key][idx])]
            taken[key][first] = look
    out = {
        "requests_per_window": n,
        "shift": f"{SHIFT_LABEL}, from look {SHIFT_FROM + 1} of {config.horizon_looks}",
    }
    for key, looks in taken.items():
        caught = looks[np.isfinite(looks)]
        out[key] = {
            "caught_within_horizon": _rate(len(caught), runs),
            "looks_median": float(np.median(caught)) if len(caught) else None,
            "looks_p90": float(np.percentile(caught, 90)) if len(caught) else None,
            "looks_max": float(caught.max()) if len(caught) else None,
        }
    return out


def alarm_budget(horizons: int, config: DriftConfig, seed: int = 0) -> dict:
    """The false-alarm simulation and the planted shift, per window size in WINDOW_SIZES."""
    begin = time.perf_counter()
    out = {
        "false_alarm_rate": config.false_alarm_rate,
        "horizon_looks": config.horizon_looks,
        "floors": {"numbers": config.num_floor, "tenant": config.cat_floor}
        | {"is_error": config.error_rate_floor, **config.floors},
        "false_alarms": [false_alarms(horizons, n, config, seed + n) for n in WINDOW_SIZES],
        "planted_shift": [planted_shift(horizons, n, config, seed + 7 * n) for n in WINDOW_SIZES],
    }
    return out | {"simulation_s": round(time.perf_counter() - begin, 1)}


def run(rows: int, out: Path | None, horizons: int = 1000) -> None:
    alarms = alarm_budget(horizons, DriftConfig()) if horizons else {}
    click.echo(alarm_lines(alarms))
    end = datetime(2026, 1, 15, 12, tzinfo=UTC)
    shifted = SHIFT
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
        "alarm_budget": alarms,
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


def alarm_lines(alarms: dict) -> str:
    """The simulation's figures, one line each, with their 95% intervals."""
    if not alarms:
        return "false-alarm simulation skipped (--horizons 0)"
    horizons = alarms["false_alarms"][0]["family_wise"]["rule"]["horizons"]
    lines = [
        f"false alarms: family-wise rate over {alarms['horizon_looks']} looks, configured "
        f"{alarms['false_alarm_rate']}; {horizons} horizons of stationary traffic per window size "
        "(95% Clopper-Pearson intervals)"
    ]
    for case in alarms["false_alarms"]:
        for key, r in case["family_wise"].items():
            lo, hi = r["ci95"]
            lines.append(
                f"  {case['requests_per_window']:>5} requests/window  {key:<16} "
                f"{r['rate']:.4f} [{lo:.4f}, {hi:.4f}]"
            )
    for case in alarms["planted_shift"]:
        for key in ("latency_ms", "alarm"):
            r = case[key]
            caught = r["caught_within_horizon"]
            lines.append(
                f"planted shift ({case['shift']}), {case['requests_per_window']} requests/window, "
                f"{'latency_ms flagged' if key == 'latency_ms' else 'drift alarm'}: caught "
                f"{caught['rate']:.3f} [{caught['ci95'][0]:.3f}, {caught['ci95'][1]:.3f}] of "
                f"{caught['horizons']} horizons; looks it took: median {r['looks_median']}, "
                f"p90 {r['looks_p90']}, max {r['looks_max']}"
            )
    return "\n".join(lines)
