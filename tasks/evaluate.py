"""Evaluate: quality (lm-eval through the served model) and speed (the load generator).

Both talk to a running OpenAI-compatible server (vLLM serving one variant), so what is measured
is what will be served: the same weights, kernels and tokenizer path.
Quality uses lm-eval's `local-completions` model with the variant's own tokenizer loaded here:
requests go out as token ids (so lm-eval can left-truncate to the server's context length, read
from /v1/models) and log-likelihoods come back through `echo` + `logprobs`.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.evaluation import SUITES_DIR, Evaluation, LoadProfile
from configs.home import Home
from configs.models import ModelConfig, Variant
from evaluation.loadgen.client import run_profile
from evaluation.loadgen.report import LoadReport
from evaluation.quality.gates import QualityResult, TaskScore, Verdict
from serving.vllm import VLLMError, VLLMServer
from tasks.gpu_slot import trial_slot
from tasks.quantize import VariantBuild
from tasks.registry import RegisteredVersion, Registry
from tasks.smoke import SmokeError, SmokeResult, ask

log = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """The evaluation could not run; the message says what to check."""


@functools.cache
def task_manager(hub_tasks: bool) -> Any:
    """One lm-eval TaskManager per process and kind: indexing the built-in tasks (needed only for
    Hub tasks such as mmlu) takes ~24 s, the shipped suites alone a fraction of that."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(SUITES_DIR), include_defaults=hub_tasks)


def served_max_model_len(base_url: str, served_model: str, timeout: float = 10) -> int:
    """The context length the server gives `served_model` (vLLM's /v1/models max_model_len)."""
    url = f"{base_url.rstrip('/')}/v1/models"
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
        models = response.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        raise EvaluationError(f"cannot list models at {url}: {e}; is the server up?") from e
    for entry in models:
        if entry.get("id") == served_model:
            if not entry.get("max_model_len"):
                raise EvaluationError(f"{url} does not report max_model_len for {served_model!r}")
            return int(entry["max_model_len"])
    names = ", ".join(m.get("id", "?") for m in models)
    raise EvaluationError(f"{url} serves {names}, not {served_model!r}")


def adds_bos(tokenizer_dir: Path) -> bool:
    """Whether the tokenizer puts special tokens (BOS) in front of plain text, as the server does
    with a text prompt; lm-eval must do the same when it sends token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    probe = "Slipway"
    return tok(probe).input_ids != tok(probe, add_special_tokens=False).input_ids


def _number(value: Any) -> float | None:
    """lm-eval writes 'N/A' for a standard error it cannot compute."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def scores_from(results: dict[str, Any]) -> dict[str, TaskScore]:
    """Per task: aggregate metrics and standard errors (filter 'none' or the first filter), and
    every numeric per-item metric by doc id, from simple_evaluate's output with log_samples."""
    scores = {}
    samples = results.get("samples", {})
    for name, row in results["results"].items():
        if name not in samples:
            continue  # a group or tag row: its members have their own rows
        metrics: dict[str, float] = {}
        stderr: dict[str, float] = {}
        for key, value in row.items():
            metric, _, _filter = key.partition(",")
            if not _filter or (number := _number(value)) is None:
                continue
            if metric.endswith("_stderr"):
                stderr.setdefault(metric.removesuffix("_stderr"), number)
            else:
                metrics.setdefault(metric, number)
        items: dict[str, dict[int, float]] = {}
        for sample in samples[name]:
            for metric in metrics:
                if (number := _number(sample.get(metric))) is not None:
                    items.setdefault(metric, {})[int(sample["doc_id"])] = number
        scores[name] = TaskScore(metrics=metrics, stderr=stderr, n=len(samples[name]), items=items)
    return scores


def _jsonable(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def write_samples(results: dict[str, Any], out_dir: Path) -> None:
    """samples_<task>.jsonl (one scored item per line) and results.json (aggregates, configs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, samples in results.get("samples", {}).items():
        with open(out_dir / f"samples_{name}.jsonl", "w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, default=_jsonable, ensure_ascii=False) + "\n")
    summary = {k: results.get(k) for k in ("results", "groups", "configs", "versions", "n-samples")}
    (out_dir / "results.json").write_text(json.dumps(summary, default=_jsonable, indent=2))


def run_quality(
    base_url: str,
    served_model: str,
    tokenizer_dir: Path,
    evaluation: Evaluation,
    out_dir: Path,
) -> QualityResult:
    """Run the evaluation's suites and tasks against the server at `base_url` (no /v1) serving
    `served_model`; per-item samples go to out_dir as JSONL."""
    import lm_eval

    if not (tokenizer_dir / "tokenizer_config.json").exists():
        raise EvaluationError(
            f"{tokenizer_dir} has no tokenizer_config.json: pass the model directory"
        )
    manager = task_manager(bool(evaluation.extra_tasks))
    if unknown := [t for t in evaluation.tasks if t not in manager.all_tasks]:
        raise EvaluationError(
            f"lm-eval has no task named {', '.join(unknown)} (evaluation.extra_tasks)"
        )
    model_args = {
        "model": served_model,
        "base_url": f"{base_url.rstrip('/')}/v1/completions",
        "tokenizer": str(tokenizer_dir),
        "tokenizer_backend": "huggingface",  # no probing of the server's /tokenize
        "tokenized_requests": True,
        "add_bos_token": adds_bos(tokenizer_dir),
        "max_length": served_max_model_len(base_url, served_model),
        "num_concurrent": evaluation.num_concurrent,
        "max_retries": evaluation.max_retries,
        "timeout": evaluation.timeout_s,
    }
    log.info("lm-eval %s on %s (%s)", evaluation.tasks, served_model, base_url)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=evaluation.tasks,
        limit=evaluation.limit,
        log_samples=True,
        task_manager=manager,
    )
    if results is None:
        raise EvaluationError("lm-eval returned no results")
    write_samples(results, out_dir)
    return QualityResult(model=served_model, tasks=scores_from(results), limit=evaluation.limit)


def run_speed(base_url: str, served_model: str, profile: LoadProfile, out_dir: Path) -> LoadReport:
    return run_profile(base_url, served_model, profile, out_dir, progress=False)


# ---- the trial: serve once, then smoke, quality and speed ----------------------------------------


QUALITY = "quality.json"


class TrialError(RuntimeError):
    """The variant could not be served, answered the smoke prompt wrongly, or could not be
    measured."""


@dataclass(frozen=True)
class Trial:
    smoke: SmokeResult
    quality: QualityResult
    speed: LoadReport
    out_dir: Path  # samples, results, load report and plot


def trial(model_dir: Path, config: ModelConfig, variant: Variant, home: Home) -> Trial:
    """Serve `model_dir` with vLLM once and measure what will be served: the smoke answer, the
    quality suites through lm-eval, the speed through the load generator."""
    out_dir = evaluation_dir(model_dir)
    name = f"{config.name}-{variant.label}"
    try:
        with VLLMServer(model_dir, name, home, config.serving) as server:
            smoke = ask(server, config.smoke)
            quality = run_quality(
                server.url, name, model_dir, config.evaluation, out_dir / "quality"
            )
            speed = run_speed(server.url, name, config.evaluation.loadgen, out_dir / "speed")
    except (VLLMError, SmokeError, EvaluationError) as e:
        raise TrialError(f"{variant.label}: {e}") from e
    (out_dir / QUALITY).write_text(quality.model_dump_json())  # the baseline of later releases
    return Trial(smoke, quality, speed, out_dir)


def evaluation_dir(model_dir: Path) -> Path:
    """Beside the weights, like the manifest and signature: per digest, so a second release of
    a variant never overwrites what the first one measured."""
    return model_dir.parent / "evaluation"


def recorded_quality(model_dir: Path) -> QualityResult | None:
    """The quality an earlier trial measured for the variant in model_dir, if it kept one."""
    path = evaluation_dir(model_dir) / QUALITY
    return QualityResult.model_validate_json(path.read_text()) if path.is_file() else None


def trial_metrics(build: VariantBuild, trial: Trial, verdict: Verdict) -> dict[str, float]:
    """Everything measured about one variant, as flat MLflow metric names."""
    metrics: dict[str, float] = {
        "smoke_load_s": trial.smoke.load_s,
        "quantize_wall_s": build.wall_s,
        "size_bytes": build.size_bytes,
        "compression_ratio": build.compression_ratio,
        "gates_passed": float(verdict.passed),
    }
    if build.peak_rss_bytes:
        metrics["quantize_peak_rss_bytes"] = build.peak_rss_bytes
    metrics.update(quality_metrics(trial.quality))
    for gate in verdict.gates:
        if gate.measured is not None:
            metrics[f"gate/{gate.name}"] = gate.measured
    metrics.update(speed_metrics(trial.speed))
    return metrics


def quality_metrics(quality: QualityResult) -> dict[str, float]:
    """Each task's metrics and standard errors as "<task>/<metric>" and "<task>/<metric>_stderr"."""
    metrics: dict[str, float] = {}
    for name, score in quality.tasks.items():
        metrics.update({f"{name}/{m}": v for m, v in score.metrics.items()})
        metrics.update({f"{name}/{m}_stderr": v for m, v in score.stderr.items()})
    return metrics


def speed_metrics(speed: LoadReport) -> dict[str, float]:
    """Each load level's figures as "speed/<level>/<figure>" (level "concurrency 4" ->
    concurrency_4)."""
    metrics: dict[str, float] = {}
    for level in speed.levels:
        prefix = "speed/" + level.label.replace(" ", "_").replace("/", "_")
        metrics[f"{prefix}/requests_per_s"] = level.requests_per_s
        metrics[f"{prefix}/output_tokens_per_s"] = level.output_tokens_per_s
        metrics[f"{prefix}/goodput_share"] = level.goodput_share
        for kind in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            for q in ("p50", "p90", "p99"):
                if (value := getattr(getattr(level, kind), q)) is not None:
                    metrics[f"{prefix}/{kind}_{q}"] = value
    return metrics


def log_trial(
    home: Home, version: RegisteredVersion, build: VariantBuild, trial: Trial, verdict: Verdict
) -> str:
    """One MLflow run per variant evaluation; the model version is tagged with the run and
    verdict."""
    (trial.out_dir / "verdict.md").write_text(verdict.markdown())
    registry = Registry(home)
    run_id = registry.log_run(
        f"{version.name}-v{version.version}-{build.label}",
        params={
            "recipe": build.recipe,
            "variant": build.label,
            "group_size": build.group_size,
            "calibration_sha256": build.calibration_sha256,
            "limit": trial.quality.limit,
        },
        metrics=trial_metrics(build, trial, verdict),
        tags={
            "model": version.name,
            "version": version.version,
            "digest": version.digest,
            "eval_status": verdict.status,
        },
        artifacts=[
            trial.out_dir / "quality",
            trial.out_dir / "speed",
            trial.out_dir / "verdict.md",
        ],
    )
    registry.tag(version.name, version.version, {"eval_run_id": run_id})
    return run_id


# ---- Prefect -------------------------------------------------------------------------------------


@task(name="trial", cache_policy=NO_CACHE)
def trial_task(model_dir: Path, config: ModelConfig, variant: Variant, home: Home) -> Trial:
    with trial_slot():  # one trial per accelerator, whichever worker's flow run asks
        return trial(model_dir, config, variant, home)


@task(name="log-evaluation", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def log_trial_task(
    home: Home, version: RegisteredVersion, build: VariantBuild, trial: Trial, verdict: Verdict
) -> str:
    return log_trial(home, version, build, trial, verdict)
