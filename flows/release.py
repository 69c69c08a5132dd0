"""The release flow: pull a model and gate its chat template; for every variant build it, serve
it once (smoke, quality, speed), judge it against bf16, sign, verify, attest its evaluation and
provenance (signed statements about its digest) and register it in MLflow with its verdict."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from configs.evaluation import Gates
from configs.home import Home
from configs.models import ModelConfig, Variant, load_model_config
from evaluation.quality.gates import QualityResult, gated_metric, judge
from serving.vllm import can_serve, detect_hardware
from tasks.attest import attest_release_task
from tasks.deployment_runs import run_all
from tasks.evaluate import TrialError, log_trial_task, recorded_quality, trial_task
from tasks.hub import pull_task
from tasks.quantize import QuantizeError, quantize_task
from tasks.registry import find_task, first_champion_task, register_task
from tasks.signing import sign_task, verify_task
from tasks.store import Store, point_task, prepare_store_task
from tasks.template import template_task
from tasks.variant_outcome import Outcome

VARIANT_DEPLOYMENT = "release-variant/release-variant"


# No log_prints: a dependency prints bytecode to stdout while datasets hashes a loader function.
@flow(name="release")
def release(
    config_path: str = "configs/models/smollm2-135m.yaml", fan_out: bool = False
) -> list[Outcome]:
    """`fan_out`: each variant as a flow run of the release-variant deployment on the work pool,
    the base first, then the others at once (their trials wait for accelerator slots); off, one
    after another in this process, which needs no worker (`make demo`)."""
    config = load_model_config(config_path)
    home = Home.from_env()
    prepare_store_task(home, config.name)
    base, _ = pull_task(config.source, config.name, home, config.allow_pickle)
    template_task(base, config, home)  # a changed or flagged chat template stops it here
    first, *rest = sorted(config.variants, key=lambda v: v.recipe != "bf16")  # the base first
    [reference] = variants(config, [first], base.digest, None, fan_out)
    # A first release's base is champion before any rollout asks.
    first_champion_task(home, config.name, [reference.version.version] if reference.version else [])
    outcomes = [reference, *variants(config, rest, base.digest, reference.quality, fan_out)]
    create_markdown_artifact(table(config.name, outcomes, config.gates), key="release-summary")
    return outcomes


def variants(
    config: ModelConfig,
    chosen: list[Variant],
    base: str,
    baseline: QualityResult | None,
    fan_out: bool,
) -> list[Outcome]:
    if not fan_out:
        return [release_variant(config, v, base, baseline) for v in chosen]
    runs = [{"config": config, "variant": v, "base": base, "baseline": baseline} for v in chosen]
    return run_all(VARIANT_DEPLOYMENT, runs)


# The result is kept so that a fanned-out run's outcome reaches the release that started it.
@flow(name="release-variant", flow_run_name="{variant.label}", persist_result=True)
def release_variant(
    config: ModelConfig, variant: Variant, base: str, baseline: QualityResult | None = None
) -> Outcome:
    """One variant of the stored base (by digest, in this worker's home): built, tried, judged
    against `baseline` (None: it is the base), signed, attested and registered."""
    home = Home.from_env()
    servable, reason = can_serve(variant.recipe, detect_hardware())
    if not servable:
        return Outcome(variant, "skipped", reason)
    if variant.recipe != "bf16" and baseline is None:
        return Outcome(
            variant, "failed", "the bf16 base failed, so there is nothing to judge against"
        )
    try:
        base_entry = Store(home, config.name).entry(base)
        built, entry, manifest = quantize_task(base_entry, variant, config.name, home)
        point_task(home, config.name, variant.label, entry.digest)
        if (done := find_task(home, config.name, manifest.digest)) and (
            quality := recorded_quality(entry.weights)
        ):
            return Outcome(
                variant,
                "registered",
                "already registered: not served again",
                built,
                version=done,
                quality=quality,
            )
        trial = trial_task(entry.weights, config, variant, home)
    except (QuantizeError, TrialError) as e:
        return Outcome(variant, "failed", str(e))
    verdict = judge(baseline, trial.quality, config.gates, trial.speed)
    signature = sign_task(entry.weights, config.signing, home)
    verify_task(entry.weights, signature.trust, home)
    tags = (
        manifest.tags()
        | {"variant": variant.label, "recipe": variant.recipe, "signature_verified": "true"}
        | signature.trust.tags()
        | verdict.tags()
        | attest_release_task(
            entry, config, variant, trial.quality, verdict, base_entry, built, home
        )
    )
    registered = register_task(home, config.name, entry.root, manifest.digest, tags)
    log_trial_task(home, registered, built, trial, verdict)
    return Outcome(variant, "registered", "", built, registered, trial.quality, trial, verdict)


def table(name: str, outcomes: list[Outcome], gates: Gates) -> str:
    """The comparison table of every variant (a Prefect artifact; MLflow has the details)."""
    tasks = next((list(o.quality.tasks) for o in outcomes if o.quality), [])
    head = [
        "variant",
        "status",
        "version",
        "verdict",
        *tasks,
        "min recovery",
        "TTFT p50 ms",
        "TPOT p50 ms",
        "out tok/s",
        "MB",
        "x smaller",
        "smoke answer",
        "note",
    ]
    rows = []
    for o in outcomes:
        cell = dict.fromkeys(head, "") | {
            "variant": o.variant.label,
            "status": o.status,
            "note": o.reason,
        }
        if o.version:
            cell["version"] = o.version.version
        if o.build:
            cell |= {
                "MB": f"{o.build.size_bytes / 1e6:.0f}",
                "x smaller": f"{o.build.compression_ratio:.2f}",
            }
        losses = {g.name.split("/")[0]: g for g in o.verdict.gates if g.loss} if o.verdict else {}
        for task, score in o.quality.tasks.items() if o.quality else []:
            metric = gated_metric(task, score, gates)
            se = score.stderr.get(metric)
            cell[task] = f"{metric} {score.metrics[metric]:.3f}" + (f" ± {se:.3f}" if se else "")
            if gate := losses.get(task):  # the margin, the loss's bounds, the flips, the decision
                cell[task] += f"; {gate.loss.cell()}: {gate.status}"
        if o.verdict:
            recoveries = [
                g.measured for g in o.verdict.gates if g.name.endswith("recovery") and g.measured
            ]
            verdict = o.verdict.status
            cell |= {
                "verdict": verdict if o.verdict.passed else verdict.upper(),
                "note": "; ".join(o.verdict.reasons),
            }
            cell["min recovery"] = f"{min(recoveries):.3f}" if recoveries else ""
        if o.trial:
            level = o.trial.speed.levels[0]
            cell |= {
                "TTFT p50 ms": _ms(level.ttft_ms.p50),
                "TPOT p50 ms": _ms(level.tpot_ms.p50),
                "out tok/s": f"{level.output_tokens_per_s:.1f}",
                "smoke answer": o.trial.smoke.answer.strip()[:40],
            }
        rows.append(
            "| "
            + " | ".join(cell[c].replace("|", "/").replace("\n", " ")[:160] for c in head)
            + " |"
        )
    return "\n".join(
        [
            f"# Release of {name}",
            "",
            "Quality: each task's score; for a variant, its loss against bf16 with one-sided "
            f"{1 - gates.alpha:.0%} bounds, the margin (1 - min recovery), the items it got "
            "worse (-) and better (+) on, and the gate's decision. Speed: the first load level; "
            "MLflow has them all.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *rows,
        ]
    )


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"
