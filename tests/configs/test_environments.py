"""configs/environments/: the shipped overlays load over the base, a bad overlay is refused naming
the field, the parity report lists exactly the differences with their verdicts, and an
environment's home shares the Slipway home's registry while keeping its stack apart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from configs.environments import ENVIRONMENTS, load_environment, merge, names, parity
from configs.home import Home
from configs.loader import ConfigError


@pytest.fixture
def folder(tmp_path) -> Path:
    """A copy of the shipped environments that a test may add overlays to."""
    return Path(shutil.copytree(ENVIRONMENTS, tmp_path / "environments"))


def overlay(folder: Path, name: str, fields: dict) -> str:
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(fields))
    return name


def test_the_shipped_environments_merge_their_overlay_over_the_base():
    assert names() == ["dev", "prod", "staging"]
    base, staging, prod = (load_environment(n) for n in (None, "staging", "prod"))
    assert (base.name, base.serving.alias, base.stack.gateway_port) == ("base", "champion", 8000)
    assert (staging.serving.alias, staging.stack.gateway_port) == ("staging", 8200)
    assert (prod.serving.alias, prod.promotion.requires) == ("champion", "staging")
    assert load_environment("dev").serving.alias == "dev"
    # What an overlay does not set is the base's, field by field inside a section.
    assert staging.stack.hostname == base.stack.hostname == "127.0.0.1"
    assert staging.trust == prod.trust == base.trust
    assert staging.serving.variants == base.serving.variants == ("bf16", "gptq-w8a8")
    assert staging.promotion.requires is None


def test_the_shipped_stacks_can_run_side_by_side_on_ports_of_their_own():
    stacks = [load_environment(n).stack for n in (None, *names())]
    ports = [
        port
        for stack in stacks
        for name, port in stack.model_dump().items()
        if name.endswith("_port")
    ]
    assert len(ports) == 4 * 6 and len(set(ports)) == len(ports)
    # Not the ports of the system services Debian's prometheus packages start (9090, 9093).
    assert not {9090, 9093} & set(ports)


def test_merge_goes_into_mappings_and_replaces_everything_else():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    assert merge(base, {"a": {"y": [3]}, "c": 4}) == {"a": {"x": 1, "y": [3]}, "b": 2, "c": 4}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}  # not changed in place


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"stack": {"gateway_port": "eighty"}}, "stack.gateway_port: Input should be a valid"),
        ({"stack": {"gatway_port": 8400}}, "stack.gatway_port: Extra inputs are not permitted"),
        ({"stack": {"gateway_port": 70000}}, "stack.gateway_port: Input should be less than"),
        ({"stack": {"gateway_port": 4200}}, "the stack's ports must differ"),
        ({"stack": {"webhook_port": 8000}}, "the stack's ports must differ"),
        ({"stack": {"monitoring": "maybe"}}, "stack.monitoring: Input should be 'optional', 'req"),
        ({"serving": {"replicas": 0}}, "serving.replicas: Input should be greater than"),
        ({"serving": {"alias": "Prod Alias"}}, "serving.alias: String should match"),
        ({"promotion": {"requires": "qa"}}, "promotion.requires: no environment 'qa'"),
        ({"declared": {"trust.keyrings": "typo"}}, "declared names 'trust.keyrings'"),
        ({"name": "other"}, "name: set by the file's name"),
    ],
)
def test_a_bad_overlay_is_refused_naming_its_file_and_field(folder, fields, named):
    with pytest.raises(ConfigError) as refused:
        load_environment(overlay(folder, "bad", fields), folder)
    assert "bad.yaml" in str(refused.value) and named in str(refused.value), str(refused.value)


def test_an_unknown_environment_is_refused_with_the_known_ones(folder):
    with pytest.raises(ConfigError, match=r"no environment 'qa' .*known: dev, prod, staging"):
        load_environment("qa", folder)


def test_parity_lists_exactly_the_differences_of_the_shipped_staging_and_prod():
    report = parity(load_environment("staging"), load_environment("prod"))
    assert [(d.field, d.left, d.right, d.verdict) for d in report.differences] == [
        ("serving.alias", "staging", "champion", "may differ"),
        ("stack.home", "environments/staging", "environments/prod", "may differ"),
        ("stack.mlflow_port", 5200, 5300, "may differ"),
        ("stack.prefect_port", 4400, 4500, "may differ"),
        ("stack.gateway_port", 8200, 8300, "may differ"),
        ("stack.prometheus_port", 9390, 9490, "may differ"),
        ("stack.alertmanager_port", 9393, 9493, "may differ"),
        ("stack.webhook_port", 9295, 9395, "may differ"),
        ("stack.monitoring", "optional", "required", "may differ"),
        ("promotion.requires", None, "staging", "may differ"),
    ]
    assert report.ok and report.lines()[-1] == "  every difference is allowed"
    same = parity(load_environment("prod"), load_environment("prod"))
    assert same.differences == () and same.lines()[-1] == "  no differences"


def test_parity_flags_a_difference_that_must_agree_unless_it_is_declared(folder):
    weak = {"trust": {"require_attestation": False}, "serving": {"variants": ["bf16", "gguf"]}}
    overlay(folder, "qa", {**weak, "stack": {"home": "environments/qa", "gateway_port": 8500}})
    report = parity(load_environment("qa", folder), load_environment(None, folder))
    verdicts = {d.field: d.verdict for d in report.differences}
    assert verdicts == {
        "serving.variants": "not allowed",
        "stack.home": "may differ",
        "stack.gateway_port": "may differ",
        "trust.require_attestation": "not allowed",
    }
    assert not report.ok
    assert [d.field for d in report.disallowed] == ["serving.variants", "trust.require_attestation"]
    assert "2 difference(s) NOT allowed" in report.lines()[-1]

    why = "qa tries GGUF on unsigned builds"
    declared = {"serving.variants": why, "trust.require_attestation": why}
    overlay(folder, "qa", {**weak, "declared": declared})
    report = parity(load_environment("qa", folder), load_environment("prod", folder))
    assert report.ok
    assert {d.field: (d.verdict, d.why) for d in report.differences if d.why} == {
        "serving.variants": ("declared", why),
        "trust.require_attestation": ("declared", why),
    }


def test_without_an_environment_the_home_is_the_slipway_home_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIPWAY_HOME", str(tmp_path))
    monkeypatch.delenv("SLIPWAY_ENVIRONMENT", raising=False)
    home = Home.from_env()
    assert home == Home(tmp_path) and Home.from_env("base") == home
    assert (home.environment, home.alias, home.previous_alias) == (None, "champion", "previous")
    assert home.mlflow == tmp_path / "mlflow" and home.logs == tmp_path / "logs"


def test_an_environment_home_keeps_its_stack_apart_and_shares_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIPWAY_HOME", str(tmp_path))
    monkeypatch.setenv("SLIPWAY_ENVIRONMENT", "staging")
    home = Home.from_env()
    assert home == Home.from_env("staging") == Home(tmp_path).of_environment("staging")
    assert home.root == tmp_path / "environments" / "staging"
    assert (home.environment, home.alias, home.previous_alias) == (
        "staging",
        "staging",
        "staging-previous",
    )
    # Its own stack: state, logs, Prefect, the gateway's keys.
    assert (home.logs, home.prefect) == (home.root / "logs", home.root / "prefect")
    assert home.admin_token.parent == home.root
    # One registry, store, keyring and set of Python environments with the Slipway home.
    assert home.tracking_uri == Home(tmp_path).tracking_uri
    for shared in ("mlflow", "models", "keys", "envs", "cache"):
        assert getattr(home, shared) == tmp_path / shared
    prod = Home.from_env("prod")
    assert (prod.root, prod.alias) == (tmp_path / "environments" / "prod", "champion")


@pytest.fixture
def started(monkeypatch, tmp_path) -> list[tuple]:
    """`slipway up`'s call into the operator, recorded instead of starting anything."""
    from serving.stack import operator

    calls: list[tuple] = []
    monkeypatch.setenv("SLIPWAY_HOME", str(tmp_path))
    monkeypatch.delenv("SLIPWAY_ENVIRONMENT", raising=False)
    monkeypatch.setattr(operator, "up", lambda home, *args, **kw: calls.append((home, *args[:3])))
    return calls


def test_up_without_an_environment_starts_the_stack_as_before(started, tmp_path):
    from click.testing import CliRunner

    from configs.models import MODEL_CONFIGS
    from flows.cli import cli

    result = CliRunner().invoke(cli, ["up", "--no-prefect"])
    assert result.exit_code == 0, result.output
    assert started == [(Home(tmp_path), 5000, 8000, MODEL_CONFIGS)]
    assert "Parity" not in result.output


def test_up_in_an_environment_prints_its_parity_then_starts_its_own_stack(started, tmp_path):
    from click.testing import CliRunner

    from configs.home import REPO
    from flows.cli import cli

    result = CliRunner().invoke(cli, ["up", "--no-prefect", "--environment", "staging"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Parity of staging against prod (configs/environments/):\n")
    assert "stack.gateway_port       8200 vs 8300  (may differ)" in result.output
    home = Home(tmp_path).of_environment("staging")
    assert started == [(home, 5200, 8200, REPO / "configs" / "models")]
    # An explicit port still wins; an unknown environment starts nothing.
    CliRunner().invoke(cli, ["up", "--no-prefect", "--environment", "prod", "--gateway-port", "9"])
    assert started[-1][2] == 9 and started[-1][0].alias == "champion"
    result = CliRunner().invoke(cli, ["up", "--no-prefect", "--environment", "qa"])
    assert result.exit_code == 1 and "no environment 'qa'" in result.output and len(started) == 2
