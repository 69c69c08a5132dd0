"""The rollout policy schema: the default loads, bad policies are refused naming the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from configs.loader import ConfigError
from configs.rollout import AnalysisPolicy, RolloutPolicy, load_rollout_policy


def write(tmp_path: Path, policy: dict) -> Path:
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def test_default_policy_loads_and_splits_alpha_across_steps() -> None:
    policy = load_rollout_policy()
    stages = policy.stages()
    assert [s.weight for s in stages] == [5, 25, 50]
    assert [s.max_seconds for s in stages] == [1800, 600, 600]
    assert sum(s.analysis.alpha for s in stages) == pytest.approx(policy.analysis.alpha)
    assert all(s.analysis.slos == policy.slos for s in stages)
    assert all(s.analysis.min_samples == policy.min_samples for s in stages)


def test_per_step_lists() -> None:
    policy = RolloutPolicy(steps=[10, 100], min_samples=[500], max_seconds=[60])
    (stage,) = policy.stages()
    assert (stage.weight, stage.analysis.min_samples, stage.max_seconds) == (10, 500, 60)


@pytest.mark.parametrize(
    ("steps", "rule"),
    [
        ([5, 50, 25, 100], "strictly increasing"),
        ([5, 5, 100], "strictly increasing"),
        ([5, 25, 50], "must end at 100"),
        ([100], "at least one canary step"),
        ([0, 100], "percentage"),
        ([5, 120], "percentage"),
    ],
)
def test_bad_steps_are_refused(tmp_path: Path, steps: list[int], rule: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_rollout_policy(write(tmp_path, {"steps": steps}))
    assert "  steps:" in str(e.value) and rule in str(e.value)


@pytest.mark.parametrize("alpha", [0, -0.1, 0.5, 1.5])
def test_alpha_out_of_range_is_refused(tmp_path: Path, alpha: float) -> None:
    with pytest.raises(ConfigError, match=re.escape("analysis.alpha")):
        load_rollout_policy(write(tmp_path, {"analysis": {"alpha": alpha}}))


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"min_samples": [100, 100]}, "min_samples"),
        ({"max_seconds": [60, 60, 60, 60]}, "max_seconds"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"min_samples": 0}, "min_samples"),
        ({"on_inconclusive": "promote"}, "on_inconclusive"),
        ({"look_interval_s": 0}, "look_interval_s"),
        ({"synthetic_rate": 0}, "synthetic_rate"),
        ({"webhook_url": "not a url"}, "webhook_url"),
        ({"analysis": {"margins": {"ttft": -0.1}}}, "analysis.margins.ttft"),
        ({"slos": {"error_rate": 2}}, "slos.error_rate"),
        ({"analysis": {"min_samples": 10}}, "set min_samples and slos at the top level"),
        ({"stpes": [5, 100]}, "stpes"),
        ({"shadow": {"rate_rps": 0}}, "shadow.rate_rps"),
        ({"shadow": {"min_pairs": 0}}, "shadow.min_pairs"),
        ({"analysis": {"quality": {"min_agreement": 1.5}}}, "analysis.quality.min_agreement"),
        (
            {"analysis": {"quality": {"accepted": 0.6, "margin": 0.5}}},
            "accepted \\+ margin = 1.1 would accept every answer",
        ),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, policy: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_rollout_policy(write(tmp_path, policy))


def test_policies_are_frozen() -> None:
    with pytest.raises(ValidationError):
        AnalysisPolicy().alpha = 0.2  # type: ignore[misc]


def test_a_metric_can_be_left_out() -> None:
    policy = RolloutPolicy.model_validate({"analysis": {"margins": {"e2e": None}}})
    assert policy.analysis.margins.e2e is None


def test_tenant_first_is_a_stage_of_its_own_sharing_alpha() -> None:
    policy = RolloutPolicy(steps=[10, 50, 100], tenant_first=True, max_seconds=[30, 60])
    stages = policy.stages()
    assert [(s.weight, s.audience) for s in stages] == [
        (100, "opted_in"),
        (10, "everyone"),
        (50, "everyone"),
    ]
    assert [s.max_seconds for s in stages] == [30, 30, 60]
    assert sum(s.analysis.alpha for s in stages) == pytest.approx(policy.analysis.alpha)


def test_the_cli_refuses_a_bad_policy_before_a_flow_starts(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    import flows.rollout
    from flows.cli import cli

    def started(*args, **kwargs):
        raise AssertionError("the rollout flow started on a bad policy")

    monkeypatch.setattr(flows.rollout, "rollout", started)
    bad = write(tmp_path, {"steps": [50, 100], "analysis": {"burn_in": 1}})
    result = CliRunner().invoke(cli, ["rollout", "run", "m", "2", "--policy", str(bad)])
    assert result.exit_code == 1, result.output
    assert "analysis.burn_in" in result.output and "greater than or equal to 2" in result.output


def test_a_shadow_phase_comes_first_shares_alpha_and_mirrors_every_step() -> None:
    policy = RolloutPolicy(
        steps=[25, 50, 100],
        min_samples=30,
        max_seconds=[100, 200],
        shadow={"rate_rps": 1.5, "min_pairs": 60, "max_seconds": 300},
    )
    stages = policy.stages()
    assert [(s.weight, s.shadow, s.mirror_rps) for s in stages] == [
        (0, True, 1.5),
        (25, False, 1.5),
        (50, False, 1.5),
    ]
    assert [s.max_seconds for s in stages] == [300, 100, 200]
    assert [s.analysis.min_samples for s in stages] == [60, 30, 30]
    assert sum(s.analysis.alpha for s in stages) == pytest.approx(policy.analysis.alpha)
    assert [s.label for s in stages][:2] == ["shadow (mirrored copies only)", "25%"]
    live_only = policy.model_copy(
        update={"shadow": policy.shadow.model_copy(update={"every_step": False})}
    )
    assert [s.mirror_rps for s in live_only.stages()] == [1.5, None, None]


def test_the_demo_policy_keeps_its_gates_and_adds_the_shadow_phase() -> None:
    demo = load_rollout_policy(Path(__file__).parents[2] / "configs/rollout/demo.yaml")
    assert demo.shadow is not None and demo.shadow.every_step
    assert demo.steps == [25, 50, 100] and demo.on_inconclusive == "rollback"
    margins = demo.analysis.margins
    assert (margins.ttft, margins.tpot, margins.e2e) == (0.25, 0.25, 0.35)
    assert (demo.analysis.alpha, demo.analysis.beta, demo.analysis.burn_in) == (0.01, 0.05, 20)
