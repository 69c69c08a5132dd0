"""`slipway`: the one command line of Slipway (also `python -m flows.cli`).

Each command imports what it runs when it runs, so that `--help` answers at once and starts
nothing, and `slipway gateway` does not pay for Prefect and MLflow.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from configs.home import REPO, Home
from configs.models import MODEL_CONFIGS
from configs.rollout import DEFAULT_POLICY

BENCHMARKS = ("gateway", "canary", "signing", "drift", "loadgen")


@click.group()
@click.version_option(package_name="slipway", message="%(prog)s %(version)s")
def cli() -> None:
    """Slipway: open LLMs from the Hub to production, and kept healthy there.

    Release a model (pull, quantize, evaluate, sign, register), serve its champion behind the
    OpenAI-compatible gateway, roll new versions out as canaries, and watch what is served.
    """


# ---- the stack -----------------------------------------------------------------------------------


ENVIRONMENT = click.option(
    "--environment",
    envvar="SLIPWAY_ENVIRONMENT",
    default=None,
    help="dev, staging or prod (configs/environments/; env SLIPWAY_ENVIRONMENT); default: none, "
    "the Slipway home itself",
)


def _or_environment(port: int) -> str:
    return f"{port}, or the environment's"


@cli.command()
@click.option("--mlflow-port", type=int, default=None, show_default=_or_environment(5000))
@click.option("--gateway-port", type=int, default=None, show_default=_or_environment(8000))
@click.option(
    "--model-configs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="configs/models, or the environment's",
    help="where a champion's `serving` section comes from (the config of its name)",
)
@click.option("--prefect-port", type=int, default=None, show_default=_or_environment(4200))
@click.option(
    "--prefect/--no-prefect",
    "with_prefect",
    default=True,
    show_default=True,
    help="start the Prefect server and worker and register the deployments; --no-prefect: no "
    "monitoring either (the incident webhook and automations need Prefect)",
)
@click.option(
    "--prefect-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=REPO / "prefect.yaml",
    show_default="prefect.yaml",
    help="the deployments to register (entrypoints relative to the checkout)",
)
@click.option(
    "--auto-rollout/--no-auto-rollout",
    envvar="SLIPWAY_AUTO_ROLLOUT",
    default=False,
    show_default=True,
    help="roll out each newly registered version whose evaluation passed "
    "(env SLIPWAY_AUTO_ROLLOUT=1)",
)
@click.option(
    "--monitoring",
    type=click.Choice(["optional", "required", "off"]),
    envvar="SLIPWAY_MONITORING",
    default=None,
    show_default="optional, or the environment's",
    help="Prometheus, Alertmanager, the incident webhook and automations (with Prefect): "
    "optional starts what is installed and says what is not; required starts nothing unless "
    "all is (env SLIPWAY_MONITORING)",
)
@click.option("--prometheus-port", type=int, default=None, show_default=_or_environment(9190))
@click.option("--alertmanager-port", type=int, default=None, show_default=_or_environment(9193))
@click.option(
    "--webhook-port",
    type=int,
    default=None,
    show_default=_or_environment(9095),
    help="the incident webhook's",
)
@ENVIRONMENT
def up(
    model_configs: Path | None,
    with_prefect: bool,
    prefect_file: Path,
    auto_rollout: bool,
    environment: str | None,
    **stack_fields: Any,  # the ports and --monitoring: the environment's stack's fields, by name
) -> None:
    """Start MLflow, Prefect (server, worker, deployments) and monitoring (Prometheus on the
    gateway with the SLO rules, Alertmanager, the incident webhook and automations), serve every
    verified champion with vLLM, and put the gateway in front. With --environment: that
    environment's stack, on its ports and in its folder, serving its alias, after its parity
    report against prod (prod's: against the base); a difference that is not allowed stops it
    before anything starts."""
    from configs.loader import ConfigError
    from serving.stack import operator
    from serving.stack.prefect_server import PrefectStack
    from serving.stack.services import LEFT, StackError

    try:
        home = Home.from_env(environment)
        env = _stack_environment(home)
        stack = _stack(env.stack, stack_fields)
        monitoring = _monitoring(stack) if with_prefect else None
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    prefect = PrefectStack(stack.prefect_port, prefect_file, auto_rollout) if with_prefect else None
    model_configs = model_configs or REPO / env.serving.model_configs
    try:
        operator.up(
            home,
            stack.mlflow_port,
            stack.gateway_port,
            model_configs,
            click.echo,
            prefect,
            monitoring,
        )
    except StackError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted. {LEFT}") from None


def _stack_environment(home: Home) -> Any:
    """The environment whose stack `up` starts: the base without one. A named one's parity
    report is said first; ClickException if a difference is not allowed."""
    from configs.environments import load_environment, parity, reference

    env = load_environment(home.environment)
    if home.environment is None:
        return env
    report = parity(env, load_environment(reference(env)))
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        raise click.ClickException(
            f"the {env.name} stack was not started: its config differs from "
            f"{report.right}'s where they must agree (above)"
        )
    click.echo(
        f"Environment {env.name}: serves the registry alias `{home.alias}`, from {home.root}"
    )
    if home.alias != "champion":
        click.echo(f"  (`slipway environments seed {env.name}` starts it from prod's champion)")
    return env


def _stack(stack: Any, given: dict[str, Any]) -> Any:
    """The environment's stack with the ports and mode given on the command line; ConfigError
    names an option at fault (two ports the same, one out of range)."""
    from pydantic import ValidationError

    from configs.environments import Stack
    from configs.loader import ConfigError, describe

    chosen = {k: v for k, v in given.items() if v is not None}
    try:
        return Stack.model_validate({**stack.model_dump(), **chosen})
    except ValidationError as e:
        raise ConfigError(f"the stack's options are invalid:\n{describe(e)}") from None


def _monitoring(stack: Any) -> Any:
    """Monitoring as the stack sets it (None when off), its configs loaded (ConfigError names
    the field at fault before anything starts)."""
    from configs.alerting import load_alerting_config
    from configs.slo import load_slo_config
    from serving.processes import HOST
    from serving.stack.monitoring import MonitoringStack

    if stack.monitoring == "off":
        return None
    return MonitoringStack(
        stack.prometheus_port,
        stack.alertmanager_port,
        stack.webhook_port,
        stack.monitoring == "required",
        load_slo_config(),
        load_alerting_config(),
        f"http://{HOST}:{stack.prefect_port}/api",
    )


@cli.command()
@click.option("--grace-s", default=20.0, show_default=True, help="seconds from SIGTERM to SIGKILL")
@ENVIRONMENT
def down(grace_s: float, environment: str | None) -> None:
    """Stop every process `up` started; fail if any is left."""
    from serving.stack import operator
    from serving.stack.services import StackError

    try:
        operator.down(Home.from_env(environment), grace_s, click.echo)
    except StackError as e:
        raise click.ClickException(str(e)) from None


@cli.command()
@ENVIRONMENT
def status(environment: str | None) -> None:
    """What the stack runs and whether each part answers."""
    from serving.stack import operator

    operator.status(Home.from_env(environment), click.echo)


@cli.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="gateway YAML (configs/gateway.yaml shows every field)",
)
@click.option("--host", default=None, help="overrides the config's host")
@click.option("--port", default=None, type=int, help="overrides the config's port")
@click.option(
    "--peer-host",
    default=None,
    help="overrides instances.peer_host: this instance's own address for the others (a pod's IP)",
)
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])
)
def gateway(
    config_path: str, host: str | None, port: int | None, peer_host: str | None, log_level: str
) -> None:
    """Serve the OpenAI-compatible gateway described by --config."""
    from configs.gateway import load_gateway_config
    from configs.loader import ConfigError
    from serving.gateway.server import serve

    try:
        config = load_gateway_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    serve(config, host, port, log_level, peer_host)


# ---- the flows -----------------------------------------------------------------------------------


@cli.command()
@click.argument(
    "config",
    default="configs/models/smollm2-135m.yaml",
    type=click.Path(dir_okay=False),
)
def release(config: str) -> None:
    """Release the model of CONFIG: pull, quantize every variant, serve each once in vLLM (smoke,
    quality, speed), judge it against bf16, sign, verify and register it in MLflow."""
    from configs.loader import ConfigError
    from flows.release import release as release_flow

    try:
        outcomes = release_flow(config)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    for outcome in outcomes:
        click.echo(outcome.line())


@cli.group()
def rollout() -> None:
    """Canary rollouts: run one, roll one back by hand, approve a paused step, reconcile what a
    killed one left."""


@rollout.command("run")
@click.argument("model")
@click.argument("candidate")
@click.option("--policy", default=str(DEFAULT_POLICY), show_default="configs/rollout/default.yaml")
@click.option("--gateway-url", default=None, help="default: the gateway `make up` started")
@click.option("--candidate-url", default=None, help="serve the canary from this running server")
@click.option(
    "--k8s-patches",
    type=click.Path(file_okay=False),
    default=None,
    help="also write every route and weight change as Kubernetes objects (HTTPRoute YAML and "
    "merge patch) into this folder (tasks/rollout/k8s_patches.py)",
)
@ENVIRONMENT
def rollout_run(
    model: str,
    candidate: str,
    policy: str,
    gateway_url: str | None,
    candidate_url: str | None,
    k8s_patches: str | None,
    environment: str | None,
) -> None:
    """Roll CANDIDATE (version, alias or variant) of MODEL out against its champion."""
    from configs.loader import ConfigError
    from configs.rollout import load_rollout_policy
    from flows.rollout import rollout as rollout_flow
    from tasks.engines import EngineError
    from tasks.gateway_admin import GatewayAdminError
    from tasks.rollout.plan import RolloutRefused
    from tasks.rollout.reconcile import ReconcileError, Unsettled

    try:  # a bad policy or environment is refused here, before a flow run starts and fails on it
        load_rollout_policy(policy)
        Home.from_env(environment)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    try:
        click.echo(
            rollout_flow(
                model, candidate, policy, gateway_url, candidate_url, k8s_patches, environment
            )
        )
    except RolloutRefused as e:
        raise click.ClickException(f"rollout refused, nothing changed: {e}") from None
    except (GatewayAdminError, EngineError, ReconcileError, Unsettled) as e:
        raise click.ClickException(str(e)) from None


@rollout.command("rollback")
@click.argument("model")
@click.option("--reason", default="rolled back by hand", show_default=True)
@click.option("--gateway-url", default=None, help="default: the gateway `make up` started")
def rollout_rollback(model: str, reason: str, gateway_url: str | None) -> None:
    """Withdraw MODEL's canary now."""
    from tasks.engines import EngineError
    from tasks.gateway_admin import GatewayAdminError
    from tasks.rollout.control import roll_back_by_hand

    try:
        versions = roll_back_by_hand(Home.from_env(), model, reason, gateway_url)
    except (GatewayAdminError, EngineError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"withdrew canary v{', v'.join(versions)}" if versions else f"{model} has no canary")


@rollout.command("approve")
@click.argument("model")
def rollout_approve(model: str) -> None:
    """Let MODEL's paused rollout step advance."""
    from tasks.rollout.control import NothingToApprove, approve

    try:
        version = approve(Home.from_env(), model)
    except NothingToApprove as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"approved v{version}; the rollout advances at its next look")


@rollout.command("reconcile")
@click.argument("model")
@click.option("--gateway-url", default=None, help="default: the gateway `make up` started")
def rollout_reconcile(model: str, gateway_url: str | None) -> None:
    """Make MODEL's gateway route, registry aliases and version tags agree after a killed rollout
    or revert (the registry's champion is what should be served), and say what was repaired."""
    from tasks.gateway_admin import GatewayAdmin, GatewayAdminError
    from tasks.registry import Registry
    from tasks.rollout.reconcile import Busy, ReconcileError, reconcile

    home = Home.from_env()
    try:
        admin = GatewayAdmin.of(home, gateway_url)
        done = reconcile(Registry(home), admin, home, model)
    except (Busy, ReconcileError, GatewayAdminError) as e:
        raise click.ClickException(str(e)) from None
    for line in done.lines():
        click.echo(line)


@cli.command()
@click.argument("model")
@click.option("--reason", default="reverted by hand", show_default=True)
@click.option("--gateway-url", default=None, help="default: the gateway `make up` started")
@click.option("--previous-url", default=None, help="serve `previous` from this running server")
def revert(model: str, reason: str, gateway_url: str | None, previous_url: str | None) -> None:
    """Put MODEL's `previous` back as champion in one step, after verifying it: the emergency
    path when a promoted model misbehaves."""
    from flows.revert import revert as revert_flow
    from tasks.engines import EngineError
    from tasks.gateway_admin import GatewayAdminError
    from tasks.rollout.plan import RolloutRefused
    from tasks.rollout.reconcile import ReconcileError, Unsettled

    try:
        click.echo(revert_flow(model, reason, gateway_url, previous_url))
    except RolloutRefused as e:
        raise click.ClickException(f"revert refused, nothing changed: {e}") from None
    except (GatewayAdminError, EngineError, ReconcileError, Unsettled) as e:
        raise click.ClickException(str(e)) from None


@cli.command()
@click.argument("model")
@click.argument("version")
@click.option("--by", required=True, help="who accepts it (recorded on the version)")
@click.option("--reason", required=True, help="why (recorded on the version)")
def accept(model: str, version: str, by: str, reason: str) -> None:
    """Accept MODEL's VERSION, whose evaluation was inconclusive, for serving: a person's
    decision, recorded on the version. No automatic rollout picks it; roll it out by hand."""
    from tasks.registry import Registry
    from tasks.servable import NotServable
    from tasks.servable import accept as accept_version

    try:
        accept_version(Registry(Home.from_env()), model, version, by, reason)
    except NotServable as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"accepted {model} v{version} for serving, by {by}: {reason}")


@cli.command()
@click.argument("model")
@click.argument("version")
def attestation(model: str, version: str) -> None:
    """Print VERSION of MODEL's signed evaluation attestation (JSON, as routes carry it) after
    checking it as serving does; its statement and the check's result go to stderr."""
    from serving.attestation import Refused, admit, verify
    from tasks.attest import policy
    from tasks.registry import Registry
    from tasks.servable import NotServable, version_of

    home = Home.from_env()
    try:
        chosen = version_of(Registry(home), model, version)
        signed = chosen.attestation
    except (NotServable, Refused) as e:
        raise click.ClickException(str(e)) from None
    if signed is None:
        raise click.ClickException(f"{model} v{version} has no evaluation attestation")
    click.echo(json.dumps(signed))
    try:
        found = verify(signed, policy(home))
        click.echo(json.dumps(found.predicate, indent=1), err=True)
        admit(signed, chosen.tags["digest"], policy(home))
        click.echo(f"servable: signed by {', '.join(found.signers)}", err=True)
    except Refused as e:
        click.echo(f"refused: {e}", err=True)


@cli.command()
@click.argument("model")
@click.argument("version")
def attest(model: str, version: str) -> None:
    """Sign an evaluation attestation for VERSION of MODEL, registered before releases attested,
    from its recorded verdict (its eval_* tags), with this home's key. Serving needs one."""
    from serving.attestation import Refused
    from tasks.attest import attest_recorded
    from tasks.registry import Registry

    try:
        made = attest_recorded(Registry(Home.from_env()), model, version)
    except Refused as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"attested {model} v{version}: {', '.join(f'{k}={v}' for k, v in made.items())}")


@cli.command()
@click.argument("kind", type=click.Choice(["digest", "key"]))
@click.argument("value")
@click.option("--reason", required=True, help="why (kept in the deny-list)")
def deny(kind: str, value: str, reason: str) -> None:
    """Deny-list a model digest or a signing key (sha256:<hex> of its DER public key): nothing
    it covers is served again (`make up`, the rollout, the revert, and running gateways, which
    re-read the list). Lists the registered versions it makes unservable."""
    from tasks.attest import covered_by
    from tasks.attest import deny as deny_value
    from tasks.registry import Registry

    home = Home.from_env()
    try:
        deny_value(home, kind, value, reason)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    registry = Registry(home)
    if kind == "key":
        hit = covered_by(registry, value)
    else:
        hit = [(m, v) for m in registry.model_names() for v in registry.versions(m, digest=value)]
    click.echo(f"deny-listed {kind} {value}: {reason}")
    for model, version in hit:
        click.echo(f"unservable: {model} v{version}")


@cli.command()
@click.argument("model", required=False)
@click.option(
    "--config-dir",
    default="configs/models",
    show_default=True,
    help="where each champion's model config (load profile, suites, gates) is found",
)
def regression(model: str | None, config_dir: str) -> None:
    """Measure every champion (or MODEL's) where it is served and judge it against its ledger."""
    from flows.regression import regression as regression_flow

    checked = regression_flow(model, config_dir)
    for outcome in checked:
        click.echo(outcome.line())
    if not checked:
        click.echo("No registered model has a `champion`: nothing to check.")


@cli.command()
@click.argument("model", required=False)
@click.option("--window-hours", default=1.0, show_default=True, help="length of each window")
@click.option(
    "--reference",
    type=click.Choice(["previous_week", "promotion"]),
    default="previous_week",
    show_default=True,
    help="the same window a week earlier, or the one after the champion's promotion",
)
@click.option(
    "--end",
    type=click.DateTime(),
    default=None,
    help="end of the current window, UTC [default: the start of this hour]",
)
@click.option(
    "--since-rollout",
    is_flag=True,
    help="instead: MODEL's last rollout, the canary's requests against the champion's",
)
def drift(
    model: str | None,
    window_hours: float,
    reference: str,
    end: datetime | None,
    since_rollout: bool,
) -> None:
    """Compare the last whole window of the gateway's traffic (all models, or MODEL's) with a
    reference window; alarm when it drifted."""
    from datetime import UTC

    from flows.drift import drift as drift_flow

    if since_rollout and not model:
        raise click.UsageError("--since-rollout needs MODEL")
    end = end.replace(tzinfo=UTC) if end else None
    reference = "rollout" if since_rollout else reference
    click.echo(drift_flow(window_hours, reference, model, end).message)


@cli.command()
@click.argument("day", required=False, type=click.DateTime(formats=["%Y-%m-%d"]))
@click.option("--today", is_flag=True, help="today so far (UTC): always-on versions bill all day")
def cost(day: datetime | None, today: bool) -> None:
    """Price DAY's traffic (UTC, default yesterday): per tenant, model and version."""
    from datetime import UTC

    from flows.cost import cost as cost_flow

    if today and day:
        raise click.UsageError("give DAY or --today, not both")
    day = datetime.now(UTC) if today else day
    click.echo(cost_flow(day.date() if day else None).line())


@cli.group()
def slo() -> None:
    """Service level objectives (configs/slo.yaml) as Prometheus rules."""


@slo.command("rules")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="the SLO config [default: configs/slo.yaml]",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder for slipway-slo.rules.yml [default: $SLIPWAY_HOME/prometheus]",
)
def slo_rules(config_path: Path | None, out: Path | None) -> None:
    """Write the SLIs' recording rules and the multi-window burn-rate alerts on them, a rule file
    for Prometheus' `rule_files` (check it with `promtool check rules`)."""
    from configs.loader import ConfigError
    from configs.slo import DEFAULT_SLO, load_slo_config
    from evaluation.monitoring.slo import write_rules

    try:
        config = load_slo_config(config_path or DEFAULT_SLO)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    click.echo(write_rules(config, out or Home.from_env().root / "prometheus"))


@cli.group()
def incidents() -> None:
    """Incidents that act: Alertmanager's config, the incident webhook, the automations that run
    the runbook (flows/incident.py) for each paging alert (configs/alerting.yaml)."""


_ALERTING_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="the alerting config [default: configs/alerting.yaml]",
)


def _alerting(config_path: Path | None) -> Any:
    from configs.alerting import DEFAULT_ALERTING, load_alerting_config
    from configs.loader import ConfigError

    try:
        return load_alerting_config(config_path or DEFAULT_ALERTING)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@incidents.command("alertmanager-config")
@_ALERTING_OPTION
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder for alertmanager.yml [default: $SLIPWAY_HOME/alertmanager]",
)
def incidents_alertmanager_config(config_path: Path | None, out: Path | None) -> None:
    """Write alertmanager.yml: every alert to the people's receivers, the alerts the runbook acts
    on to the incident webhook too (check it with `amtool check-config`)."""
    from evaluation.monitoring.alerting import write_alertmanager_config

    path = write_alertmanager_config(
        _alerting(config_path), out or Home.from_env().root / "alertmanager"
    )
    click.echo(path)


@incidents.command("webhook")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9095, show_default=True)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="refuse POSTs without this bearer token (the receiver's token_file in the config)",
)
def incidents_webhook(host: str, port: int, token_file: Path | None) -> None:
    """Serve the incident webhook: each alert Alertmanager POSTs to /alerts becomes a Prefect
    event (slipway.alert.firing or .resolved) on PREFECT_API_URL."""
    import uvicorn
    from prefect.settings import PREFECT_API_URL

    from serving.stack.alert_webhook import PATH, build_app

    if not PREFECT_API_URL.value():
        raise click.ClickException("set PREFECT_API_URL: the events go to that Prefect server")
    token = token_file.read_text().strip() if token_file else None
    click.echo(f"incident webhook on http://{host}:{port}{PATH} -> {PREFECT_API_URL.value()}")
    uvicorn.run(build_app(token), host=host, port=port, log_level="info")


@incidents.command("automations")
@_ALERTING_OPTION
@click.option("--deployment", default="incident/incident", show_default=True)
def incidents_automations(config_path: Path | None, deployment: str) -> None:
    """Create (or replace) one automation per alert of `incidents.act_on`: each firing alert runs
    the runbook deployment, the alert as its parameter."""
    from tasks import incident_automation

    try:
        names = incident_automation.apply(_alerting(config_path).incidents.act_on, deployment)
    except LookupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"automations {', '.join(names)} on: each runs {deployment}")


@cli.group()
def export() -> None:
    """The live routing table in the terms of other systems."""


@export.command("k8s")
@click.argument("models", nargs=-1)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="gateway YAML naming the state store [default: the one `make up` wrote, else the "
    "default store]",
)
@click.option("--namespace", default="slipway", show_default=True)
@click.option("--gateway", default="inference-gateway", show_default=True, help="parent Gateway")
@click.option("--target-port", default=8000, show_default=True, help="vLLM's port in its pods")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="write the YAML here [default: stdout]",
)
@click.option(
    "--rollout-steps",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="dry run: write into this folder the HTTPRoute (and its merge patch) of every step a "
    "rollout of each route's canary would take under --policy; nothing is applied",
)
@click.option("--policy", default=str(DEFAULT_POLICY), show_default="configs/rollout/default.yaml")
def export_k8s(
    models: tuple[str, ...],
    config_path: Path | None,
    namespace: str,
    gateway: str,
    target_port: int,
    out: Path | None,
    rollout_steps: Path | None,
    policy: str,
) -> None:
    """The gateway's routes (of MODELS, or all) from its state store as Gateway API Inference
    Extension objects: an InferencePool per version and an HTTPRoute per model whose backendRefs
    carry the weights (tasks/k8s_export.py names the API versions)."""
    from configs.gateway import StateSpec, load_gateway_config
    from configs.loader import ConfigError
    from configs.rollout import load_rollout_policy
    from serving.gateway.state.store import StateError
    from tasks.k8s_export import ExportError, Target, dns_label, read_routes, render, to_yaml

    home = Home.from_env()
    written = home.root / "gateway" / "gateway.yaml"
    try:
        if config_path is None and not written.is_file():
            state = StateSpec()
        else:
            state = load_gateway_config(config_path or written).state
        routes = read_routes(state, home)
        if missing := sorted(set(models) - set(routes)):
            raise click.ClickException(f"no route for {', '.join(missing)} in the state store")
        chosen = [r for m, r in routes.items() if not models or m in models]
        target = Target(namespace, gateway, target_port)
        if rollout_steps is not None:
            from tasks.rollout.k8s_patches import rollout_steps as steps

            rules, wrote = load_rollout_policy(policy), False
            for route in chosen:
                try:
                    paths = steps(route, rules, rollout_steps / dns_label(route.model), target)
                except ExportError as e:
                    click.echo(f"{route.model}: skipped: {e}")
                    continue
                wrote = True
                for path in paths:
                    click.echo(path)
            if not wrote:
                raise click.ClickException("no route holds one canary: no steps to write")
            return
        text = to_yaml(render(chosen, target))
    except (ConfigError, StateError, ExportError) as e:
        raise click.ClickException(str(e)) from None
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"{len(chosen)} routes written to {out}")


# ---- environments --------------------------------------------------------------------------------


@cli.group()
def environments() -> None:
    """dev, staging and prod (configs/environments/): their configs, their parity, the alias each
    serves, and the staging pass a version needs before prod."""


def _environment(name: str | None):
    from configs.environments import load_environment
    from configs.loader import ConfigError

    try:
        return load_environment(name)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@environments.command("show")
@click.argument("name", required=False)
def environments_show(name: str | None) -> None:
    """NAME's config (its overlay over base.yaml) as YAML; the base without NAME."""
    import yaml

    click.echo(
        yaml.safe_dump(_environment(name).model_dump(mode="json"), sort_keys=False), nl=False
    )


@environments.command("parity")
@click.argument("name")
@click.argument("against", required=False)
def environments_parity(name: str, against: str | None) -> None:
    """What differs between NAME and AGAINST (default: prod, or for prod the base), and whether
    each difference is allowed; exits 1 if one is not."""
    from configs.environments import parity, reference

    env = _environment(name)
    report = parity(env, _environment(against or reference(env)))
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        raise SystemExit(1)


@environments.command("seed")
@click.argument("name")
@click.option("--from", "source", default="champion", show_default=True, help="a registry alias")
def environments_seed(name: str, source: str) -> None:
    """Point NAME's alias, for each model where it points nowhere, at the version the registry
    alias --from names (prod's `champion`): NAME serves it, and rollouts there go on from it."""
    from tasks.environments import seed
    from tasks.registry import Registry

    _environment(name)
    registry = Registry(Home.from_env(name))
    for line in seed(registry, source) or [f"nothing to seed: `{registry.role('champion')}` set"]:
        click.echo(line)


@environments.command("soak")
@click.argument("name")
@click.argument("model")
@click.argument("version")
@click.option("--by", required=True, help="who decided")
@click.option("--reason", required=True, help="e.g. soaked 48 h in staging without an incident")
def environments_soak(name: str, model: str, version: str, by: str, reason: str) -> None:
    """Record that MODEL VERSION passed NAME by a soak (it serves there as NAME's alias), as a
    promoting rollout there would: the tag `passed.NAME` that prod's rollouts require."""
    from tasks.environments import record_pass
    from tasks.registry import Registry

    _environment(name)
    registry = Registry(Home.from_env(name))
    serving = registry.alias(model, "champion")
    if serving != version:
        alias = registry.role("champion")
        raise click.ClickException(
            f"{model} v{version} does not serve in {name} (`{alias}` is "
            f"{f'v{serving}' if serving else 'unset'}): only a version that ran there can soak"
        )
    click.echo(record_pass(registry, model, version, f"soak, by {by}: {reason}"))


# ---- the model store -----------------------------------------------------------------------------


@cli.group()
def store() -> None:
    """The model store: one directory per digest under $SLIPWAY_HOME/models, written once."""


@store.command("list")
@click.argument("model", required=False)
def store_list(model: str | None) -> None:
    """Every stored entry (of MODEL, or of every model), its size and the labels naming it."""
    from tasks.store import Store

    home = Home.from_env()
    models = [model] if model else sorted(p.name for p in home.models.glob("*") if p.is_dir())
    for name in models:
        store = Store(home, name)
        labels = store.labels()
        for entry in store.entries():
            named = ", ".join(sorted(k for k, v in labels.items() if v == entry.digest))
            size = entry.size_bytes() / 1e6
            click.echo(f"{name}  {entry.digest}  {size:.0f} MB  {named or '(no label)'}")


@store.command("fetch")
@click.argument("model")
@click.argument("version")
def store_fetch(model: str, version: str) -> None:
    """Materialise VERSION of MODEL from MLflow's artifact copy into this node's store, verified
    against its registered digest and signature first."""
    from tasks.fetch import FetchError, fetch
    from tasks.registry import Registry

    try:
        entry, fetched = fetch(Registry(Home.from_env()), model, version)
    except FetchError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{'fetched' if fetched else 'already stored'}: {model} v{version} at {entry.root}")


@store.command("migrate")
def store_migrate() -> None:
    """Move model directories of the layout before the store (models/<name>/<variant>/) into it."""
    from tasks.store import migrate

    moved = migrate(Home.from_env())
    click.echo("\n".join(moved) if moved else "nothing to migrate: the home uses the store")


@cli.command()
@click.option("--dry-run", is_flag=True, help="list what would be freed, remove nothing")
def gc(dry_run: bool) -> None:
    """Remove the stored model directories no registered version references (what an alias
    names is always registered, so never removed), and say what was freed."""
    from tasks.gc import GcRefused, collect

    try:
        freed, cleaned = collect(Home.from_env(), dry_run)
    except GcRefused as e:
        raise click.ClickException(str(e)) from None
    verb = "would free" if dry_run else "freed"
    for f in freed:
        click.echo(f"{verb} {f.model} {f.digest} ({f.bytes / 1e6:.0f} MB)")
    for line in cleaned:
        click.echo(line)
    total = sum(f.bytes for f in freed) / 1e6
    click.echo(f"{verb} {total:.0f} MB in {len(freed)} entries")


def _passphrase(path: Path | None) -> bytes | None:
    return path.read_bytes().strip() if path else None


@cli.command()
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--private-key-passphrase-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="also back up the private signing key, encrypted with the passphrase in this file",
)
def backup(dest: Path, private_key_passphrase_file: Path | None) -> None:
    """Back this home up into DEST: registry, artifacts, model store, keyring, state and usage."""
    from tasks.backup import BackupError
    from tasks.backup import backup as write_backup

    try:
        record = write_backup(Home.from_env(), dest, _passphrase(private_key_passphrase_file))
    except BackupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"backed up {len(record['files'])} files into {dest} (backup.json lists them)")


@cli.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--private-key-passphrase-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="the passphrase of a backed-up private signing key",
)
def restore(source: Path, private_key_passphrase_file: Path | None) -> None:
    """Restore the backup in SOURCE into this (empty) home; `make up` then serves its champions."""
    from tasks.backup import BackupError
    from tasks.backup import restore as read_backup

    try:
        restored = read_backup(source, Home.from_env(), _passphrase(private_key_passphrase_file))
    except BackupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"restored {', '.join(restored)} into {Home.from_env().root}")


# ---- keys ----------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Secrets: tenant API keys and the admin token (shown once; configs hold only their hash),
    and the signing key."""


@keys.command("new")
@click.argument("tenant")
def keys_new(tenant: str) -> None:
    """A new API key for TENANT, and the config entry that holds its hash."""
    from serving.gateway.auth import key_hash, new_secret

    key = new_secret("sk-slipway-")
    click.echo(f"key (shown once, give it to {tenant}): {key}")
    click.echo("config entry for configs/gateway.yaml tenants:")
    click.echo(f"  - name: {tenant}\n    key_sha256: {key_hash(key)}")


@keys.command("admin")
def keys_admin() -> None:
    """A new admin token (for the rollout flow), and its hash for the config."""
    from serving.gateway.auth import key_hash, new_secret

    token = new_secret("sk-slipway-admin-")
    click.echo(f"admin token (shown once): {token}")
    click.echo(f"admin_token_sha256: {key_hash(token)}")


@keys.command("signing")
def keys_signing() -> None:
    """Create the default signing key once (an existing one is kept, never replaced)."""
    from tasks.signing import SigningKeyError, key_fingerprint, keygen

    try:
        private, public = keygen(Home.from_env())
    except SigningKeyError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"signing key: {private} (public {public}, {key_fingerprint(public)})")


@keys.command("rotate")
def keys_rotate() -> None:
    """Sign from now on with a new key; versions the old key signed keep verifying (its public
    half stays in the keyring) and its private half is deleted."""
    from tasks.signing import rotate

    old, new = rotate(Home.from_env())
    click.echo(f"signing key rotated: {old or '(none)'} -> {new}")


# ---- load generator ------------------------------------------------------------------------------


@keys.command("covers")
@click.argument("key")
def keys_covers(key: str) -> None:
    """The registered versions KEY (sha256:<hex>) signed, weights or evaluation: what
    deny-listing it (`slipway deny key KEY`) makes unservable."""
    from tasks.attest import covered_by
    from tasks.registry import Registry

    for model, version in covered_by(Registry(Home.from_env()), key):
        click.echo(f"{model} v{version}")


@cli.group()
def tenants() -> None:
    """Tenants and their API keys on the running gateway, by its admin API: every instance on the
    same state store applies a change within a second, and each change is in the audit log."""


gateway_url_option = click.option(
    "--gateway-url", default=None, help="default: the gateway `make up` started"
)


def _admin(gateway_url: str | None, method: str, path: str, body: Any = None, **params: str):
    from tasks.gateway_admin import GatewayAdmin, GatewayAdminError

    try:
        return GatewayAdmin.of(Home.from_env(), gateway_url).call(method, path, body, params)
    except GatewayAdminError as e:
        raise click.ClickException(str(e)) from None


def _echo_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2))


@tenants.command("create")
@click.argument("name")
@click.option("--tier", default="standard", show_default=True)
@click.option("--rpm", type=int, default=None, help="requests per minute")
@click.option("--tpm", type=int, default=None, help="tokens per minute")
@click.option("--monthly-token-budget", type=int, default=None)
@click.option(
    "--monthly-budget-usd",
    type=float,
    default=None,
    help="dollars per month, charged at the tenant's or its tier's chargeback rate",
)
@click.option("--model", "models", multiple=True, help="a model it may use (repeat); default all")
@gateway_url_option
def tenants_create(name: str, models: tuple[str, ...], gateway_url: str | None, **limits: Any):
    """Create or replace tenant NAME with a tier and limits (the rest of its settings: PUT
    /admin/tenants/NAME)."""
    body = {k: v for k, v in limits.items() if v is not None} | (
        {"models": models} if models else {}
    )
    _echo_json(_admin(gateway_url, "PUT", f"/admin/tenants/{name}", body))


@tenants.command("list")
@gateway_url_option
def tenants_list(gateway_url: str | None) -> None:
    """Every tenant and its settings."""
    _echo_json(_admin(gateway_url, "GET", "/admin/tenants"))


@tenants.command("issue-key")
@click.argument("name")
@click.option("--expires-in", type=float, default=None, help="seconds; default never")
@gateway_url_option
def tenants_issue_key(name: str, expires_in: float | None, gateway_url: str | None) -> None:
    """A new API key for tenant NAME, shown once."""
    import time

    expires_at = time.time() + expires_in if expires_in else None
    issued = _admin(gateway_url, "POST", f"/admin/tenants/{name}/keys", {"expires_at": expires_at})
    click.echo(f"key {issued['id']} (shown once, give it to {name}): {issued['key']}")


@tenants.command("keys")
@click.argument("name", required=False)
@gateway_url_option
def tenants_keys(name: str | None, gateway_url: str | None) -> None:
    """The keys (of tenant NAME): ids and times, never a secret."""
    params = {"tenant": name} if name else {}
    _echo_json(_admin(gateway_url, "GET", "/admin/keys", **params))


@tenants.command("revoke")
@click.argument("key_id")
@gateway_url_option
def tenants_revoke(key_id: str, gateway_url: str | None) -> None:
    """Refuse key KEY_ID from now on."""
    _echo_json(_admin(gateway_url, "POST", f"/admin/keys/{key_id}/revoke"))


@tenants.command("rotate")
@click.argument("key_id")
@click.option("--overlap", type=float, default=3600, show_default=True, help="seconds")
@gateway_url_option
def tenants_rotate(key_id: str, overlap: float, gateway_url: str | None) -> None:
    """A new key replacing KEY_ID, which stays valid for --overlap seconds."""
    rotated = _admin(gateway_url, "POST", f"/admin/keys/{key_id}/rotate", {"overlap_s": overlap})
    new = rotated["new"]
    click.echo(f"key {new['id']} (shown once) replaces {key_id}: {new['key']}")


@tenants.command("expire")
@click.argument("key_id")
@click.option("--in", "in_s", type=float, required=True, help="seconds from now")
@gateway_url_option
def tenants_expire(key_id: str, in_s: float, gateway_url: str | None) -> None:
    """Let key KEY_ID expire in --in seconds."""
    import time

    body = {"expires_at": time.time() + in_s}
    _echo_json(_admin(gateway_url, "POST", f"/admin/keys/{key_id}/expire", body))


@cli.command()
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--action", default=None, help="an action or its prefix, e.g. key. or route.weights")
@click.option("--actor", default=None, help="an admin id")
@gateway_url_option
def audit(limit: int, action: str | None, actor: str | None, gateway_url: str | None) -> None:
    """The gateway's audit log: who changed routes, weights, tenants and keys, before and after."""
    import time

    params = {"limit": str(limit)} | ({"action": action} if action else {})
    params |= {"actor": actor} if actor else {}
    for r in _admin(gateway_url, "GET", "/admin/audit", **params)["records"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"]))
        click.echo(f"{when}Z {r['actor']:<10} {r['action']:<14} {r['target']}  ({r['request_id']})")


def levels(_ctx: click.Context, _param: click.Parameter, value: str) -> list[int]:
    """A comma-separated list of concurrency levels."""
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers like 1,2,4") from e


def profile_options(f: Any) -> Any:
    options = [
        click.option("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000"),
        click.option("--model", required=True, help="the served model name"),
        click.option(
            "--concurrency",
            default="1,2,4,8",
            callback=levels,
            show_default=True,
            help="sweep levels",
        ),
        click.option("--num-prompts", default=48, show_default=True, help="measured per level"),
        click.option("--warmup", default=2, show_default=True, help="unmeasured, per level"),
        click.option(
            "--prompts",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="JSONL prompt set (default: the shipped one)",
        ),
        click.option("--max-tokens", type=int, default=None, help="cap on output tokens"),
        click.option(
            "--max-prompt-chars",
            type=int,
            default=None,
            help="skip longer prompts (for models with a short context)",
        ),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def load_profile(**fields: Any):
    from pydantic import ValidationError

    from configs.evaluation import LoadProfile
    from configs.loader import describe

    try:
        return LoadProfile(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise click.UsageError(f"invalid load profile:\n{describe(e)}") from e


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


@cli.group()
def loadgen() -> None:
    """Drive an OpenAI-compatible server and measure TTFT, TPOT, ITL, throughput and goodput."""


@loadgen.command("run")
@profile_options
@click.option(
    "--profile",
    "mode",
    type=click.Choice(["synchronous", "sweep", "poisson"]),
    default="sweep",
    show_default=True,
)
@click.option("--rate", type=float, default=None, help="poisson: requests per second")
@click.option(
    "--endpoint",
    type=click.Choice(["completions", "chat"]),
    default="completions",
    show_default=True,
)
@click.option("--slo-ttft-ms", type=float, default=None, help="goodput SLO (default 2000)")
@click.option("--slo-tpot-ms", type=float, default=None, help="goodput SLO (default 200)")
@click.option("--no-ignore-eos", is_flag=True, help="let the model stop early (non-vLLM servers)")
def loadgen_run(
    base_url: str,
    model: str,
    concurrency: list[int],
    mode: str,
    out: Path,
    no_ignore_eos: bool,
    **fields: Any,
) -> None:
    """Run one profile and write report.json and report.png to --out."""
    from evaluation.loadgen.client import run_profile

    profile = load_profile(
        mode=mode,
        ignore_eos=not no_ignore_eos,
        concurrency=concurrency if mode == "sweep" else None,
        **fields,
    )
    report = run_profile(base_url, model, profile, out)
    for lv in report.levels:
        click.echo(
            f"{lv.label}: {lv.completed} ok, {lv.failed} failed, {lv.requests_per_s:.2f} req/s, "
            f"{lv.output_tokens_per_s:.1f} tok/s, TTFT p50 {_ms(lv.ttft_ms.p50)}, "
            f"TPOT p50 {_ms(lv.tpot_ms.p50)}, goodput {lv.goodput_share:.0%}"
        )
    click.echo(f"wrote {out / 'report.json'} and {out / 'report.png'}")


@loadgen.command("compare")
@profile_options
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="the served model's tokenizer directory (for vllm bench)",
)
@click.option(
    "--vllm",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="vllm executable (default: the serve environment's)",
)
@click.option("--tolerance", default=0.05, show_default=True)
def loadgen_compare(
    base_url: str,
    model: str,
    concurrency: list[int],
    out: Path,
    tokenizer: Path,
    vllm: Path | None,
    tolerance: float,
    **fields: Any,
) -> None:
    """Run this generator and `vllm bench serve` side by side on the same prompts (at
    concurrency c, c times --num-prompts)."""
    from evaluation.benchmarks.vllm_bench import compare_with_vllm_bench

    profile = load_profile(mode="sweep", concurrency=concurrency, **fields)
    try:
        comparison = compare_with_vllm_bench(
            base_url, model, tokenizer, profile, out, vllm=vllm, tolerance=tolerance
        )
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(comparison.markdown())
    if not comparison.agree:
        raise SystemExit(1)


# ---- benchmarks ----------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option(
    "--reuse",
    multiple=True,
    type=click.Choice(BENCHMARKS),
    help="take this benchmark's JSON from an earlier run (repeatable)",
)
@click.pass_context
def bench(ctx: click.Context, reuse: tuple[str, ...]) -> None:
    """Run every CPU benchmark and write bench/report.md and report.json (or one benchmark, by
    its command)."""
    if ctx.invoked_subcommand is None:
        from evaluation.benchmarks import report

        report.run(reuse)


@bench.command("gateway")
@click.option("--duration", default=5, show_default=True, help="seconds per wrk run")
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="rounds, each measuring every proxy beside going direct; figures are their medians",
)
@click.option("--skip-litellm", is_flag=True, help="gateway figures only")
@click.option(
    "--control-plane",
    is_flag=True,
    help="the gateway also balances over two replicas (two mock upstreams), with its queue and "
    "response cache on, and a cache hit's latency is measured",
)
def bench_gateway(duration: int, repeats: int, skip_litellm: bool, control_plane: bool) -> None:
    """Gateway vs LiteLLM proxy vs a bare proxy, on one mock upstream, pinned to cores."""
    from evaluation.benchmarks import gateway as benchmark

    benchmark.run(duration, skip_litellm, repeats, control_plane)


@bench.command("canary")
@click.option("--runs", default=1000, show_default=True, help="simulated rollouts per scenario")
@click.option("--rate", default=10.0, show_default=True, help="requests per second, both arms")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_POLICY,
    show_default="configs/rollout/default.yaml",
    help="rollout policy YAML",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder for canary.json and canary.md [default: $SLIPWAY_HOME/bench]",
)
@click.option(
    "--aa-runs", default=None, type=int, help="rollouts per good canary [default: --runs]"
)
@click.option("--tuning", is_flag=True, help="use the tuning half of the recorded latencies")
def bench_canary(
    runs: int,
    rate: float,
    seed: int,
    policy_path: Path,
    out: Path | None,
    aa_runs: int | None,
    tuning: bool,
) -> None:
    """Simulated rollouts: Slipway's sequential analysis vs Flagger, with and without mirroring."""
    from evaluation.benchmarks import canary as benchmark
    from evaluation.benchmarks import canary_mirrored

    benchmark.run(runs, rate, seed, policy_path, out, canary_mirrored.run, aa_runs, tuning)


@bench.command("arms")
@click.option("--a", "a", required=True, help="the reference engine, URL=MODEL (e.g. stable)")
@click.option("--b", "b", required=True, help="the engine judged against it, URL=MODEL")
@click.option("--rate", default=2.0, show_default=True, help="arrivals per second (the demo's)")
@click.option("--paired", default=240, show_default=True, help="arrivals sent to both, A-B-B-A")
@click.option("--split", default=240, show_default=True, help="arrivals sent to one, by a coin")
@click.option("--max-tokens", default=16, show_default=True, help="as the synthetic load asks")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder for samples.jsonl, arms.json, arms.md [default: $SLIPWAY_HOME/bench/arms]",
)
def bench_arms(
    a: str, b: str, rate: float, paired: int, split: int, max_tokens: int, seed: int, out
) -> None:
    """Two running engines side by side: B's latency ratios to A and their answers' agreement."""
    from evaluation.benchmarks import arms as benchmark

    out = out or Home.from_env().root / "bench" / "arms"
    try:
        benchmark.run(a, b, rate, paired, split, max_tokens, seed, out)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@bench.command("gates")
@click.option("--seeds", default=2000, show_default=True, help="simulated suites per variant")
@click.option("--margin", default=0.10, show_default=True, help="relative loss allowed")
@click.option("--alpha", default=0.05, show_default=True, help="the gate's one-sided error rate")
def bench_gates(seeds: int, margin: float, alpha: float) -> None:
    """The release's quality gate simulated: its false-pass rate at the margin, per suite size."""
    from evaluation.benchmarks import gates as benchmark

    benchmark.run(seeds, margin, alpha)


@bench.command("signing")
@click.option("--size-gb", default=1.0, show_default=True, help="total size of the generated model")
@click.option("--files", default=8, show_default=True, help="weight shards it is split into")
@click.option("--rounds", default=3, show_default=True, help="side-by-side rounds; medians")
def bench_signing(size_gb: float, files: int, rounds: int) -> None:
    """Signing and verification throughput as a share of sha256 x cores on this machine."""
    from evaluation.benchmarks import signing as benchmark

    benchmark.run(size_gb, files, rounds)


@bench.command("drift")
@click.option("--rows", default=1_000_000, show_default=True, help="requests per window")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder for drift.json [default: $SLIPWAY_HOME/bench]",
)
@click.option(
    "--horizons",
    default=1000,
    show_default=True,
    type=click.IntRange(min=0),
    help="simulated weeks of hourly looks for the false-alarm rate (0: skip)",
)
def bench_drift(rows: int, out: Path | None, horizons: int) -> None:
    """The drift check's false alarms over simulated weeks of hourly looks, and its time and peak
    memory on a million requests per window."""
    from evaluation.benchmarks import drift as benchmark

    benchmark.run(rows, out, horizons)


@bench.command("loadgen")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=MODEL_CONFIGS / "smollm2-135m.yaml",
    show_default="configs/models/smollm2-135m.yaml",
)
@click.option("--concurrency", default="1,4", callback=levels, show_default=True)
@click.option(
    "--num-prompts",
    default=64,
    show_default=True,
    help="measured per tool at concurrency 1; c times as many at concurrency c",
)
@click.option("--tolerance", default=0.05, show_default=True)
def bench_loadgen(config: Path, concurrency: list[int], num_prompts: int, tolerance: float) -> None:
    """The load generator vs `vllm bench serve` on one vLLM serving the embedded model."""
    from evaluation.benchmarks import loadgen as benchmark

    benchmark.run(config, concurrency, num_prompts, tolerance)


@bench.command("mock-upstream")
@click.option("--port", type=int, required=True)
@click.option("--chunks", type=int, default=4, help="streamed chunks when max_tokens is not given")
@click.option("--delay-s", type=float, default=0.0, help="service time before every answer")
@click.option("--chunk-delay-s", type=float, default=0.0, help="pause after each streamed chunk")
def bench_mock_upstream(port: int, chunks: int, delay_s: float, chunk_delay_s: float) -> None:
    """Serve the fake OpenAI-compatible upstream the benchmarks and tests use, on 127.0.0.1."""
    from evaluation.benchmarks import mock_upstream

    mock_upstream.run(port, chunks, delay_s, chunk_delay_s)


def help_text(group: click.Group) -> str:
    """Every command's --help as markdown: the README's command reference (cog writes it, and
    `cog --check` fails the tests when it is stale). The width is fixed so it renders the same
    on any terminal."""
    parts: list[str] = []

    def walk(command: click.Command, name: str, parent: click.Context | None) -> None:
        ctx = click.Context(
            command, info_name=name, parent=parent, terminal_width=100, max_content_width=100
        )
        title = ctx.command_path
        parts.append(f"### `{title}`\n\n```text\n{command.get_help(ctx)}\n```\n")
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                walk(command.get_command(ctx, sub), sub, ctx)

    walk(group, "slipway", None)
    return "\n".join(parts)


def main() -> None:
    cli(prog_name="slipway")


if __name__ == "__main__":
    main()
