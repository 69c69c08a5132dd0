"""Register: each variant directory becomes an MLflow logged model (type "llm") and a model version.

Weights are logged as files, never loaded. The version's tags carry the model digest, source,
revision, variant and signer; the signature and manifest travel as artifacts. Registering a digest
that is already registered returns the existing version, so re-runs add nothing. Aliases
(champion, canary, previous) are moved here, with their history kept as registered-model tags.

Environments share the one registry, each serving an alias of its own (configs/environments.py):
a Registry on an environment's home reads and moves that alias wherever the code says `champion`,
and `<alias>-previous` wherever it says `previous` (`staging`, `staging-previous` in staging), so
that a rollout, revert or reconcile in staging never touches prod's `champion`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.logged_model_status import LoggedModelStatus
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from configs.home import Home
from configs.settings import Settings

log = logging.getLogger(__name__)

EXPERIMENT = "slipway-releases"
EVALUATIONS = "slipway-evaluations"
HISTORY_KEEP = 50  # alias moves kept per alias; MLflow tag values are bounded in size
# The Prefect event a new model version emits; the auto-rollout automation (tasks/auto_rollout.py)
# starts the rollout deployment on it when the version's evaluation passed.
REGISTERED_EVENT = "slipway.model.registered"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_id: str
    digest: str
    created: bool  # False when the digest was already registered


class Registry:
    """A thin, explicit handle on one MLflow tracking/registry store (no global mlflow state)."""

    def __init__(self, home: Home, tracking_uri: str | None = None):
        self.home = home
        self.uri = tracking_uri or home.tracking_uri
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        # MLflow's sqlalchemy registry looks logged models up through a default MlflowClient(), i.e.
        # the process-wide tracking URI, so that one must name the same store.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    def experiment_id(self, name: str = EXPERIMENT) -> str:
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        # A server decides where artifacts go (--artifacts-destination, SLIPWAY_ARTIFACT_ROOT); a
        # local store keeps them under SLIPWAY_ARTIFACT_ROOT (an s3:// URI: off the box), else here.
        local = Settings().artifact_uri(self.home.artifact_root)
        location = None if self.uri.startswith("http") else local
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by a concurrent run
            return self.client.get_experiment_by_name(name).experiment_id

    # ---- versions --------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Every registered model's name, sorted."""
        names, token = [], None
        while True:
            page = self.client.search_registered_models(page_token=token)
            names += [m.name for m in page]
            if not (token := page.token):
                return sorted(names)

    def find(self, name: str, digest: str) -> str | None:
        """The version of `name` registered with this digest, if any."""
        try:
            found = self.client.search_model_versions(f"name='{name}' and tags.digest='{digest}'")
        except MlflowException:
            return None
        return min((str(v.version) for v in found), key=int, default=None)

    def register(
        self, name: str, variant_dir: Path, digest: str, tags: dict[str, str]
    ) -> RegisteredVersion:
        """Log variant_dir (weights/, manifest.json, model.sig) and register it, once per digest."""
        if existing := self.find(name, digest):
            return self.registered(name, existing, digest)
        tags = {**tags, "digest": digest}
        experiment = self.experiment_id()
        model = self.client.create_logged_model(
            experiment, name=f"{name}-{tags.get('variant', 'model')}", tags=tags, model_type="llm"
        )
        try:
            self.client.log_model_artifacts(model.model_id, str(variant_dir))
        except Exception:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(
                name, description="Registered by Slipway's release flow"
            )
        version = self.client.create_model_version(
            name, source=f"models:/{model.model_id}", tags=tags, model_id=model.model_id
        )
        log.info("registered %s version %s (%s)", name, version.version, digest)
        return RegisteredVersion(name, str(version.version), model.model_id, digest, created=True)

    def download(self, name: str, version: str, dest: Path) -> Path:
        """The version's artifact copy (what `register` logged), downloaded into `dest`."""
        source = self.client.get_model_version(name, version).source  # models:/<model id>
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dest), tracking_uri=self.uri
        )
        return Path(path)

    def registered(self, name: str, version: str, digest: str) -> RegisteredVersion:
        model_id = self.client.get_model_version(name, version).model_id
        return RegisteredVersion(name, version, model_id, digest, created=False)

    def exists(self, name: str, version: str) -> bool:
        try:
            self.client.get_model_version(name, version)
        except MlflowException:
            return False
        return True

    def versions(self, name: str, **tags: str) -> list[str]:
        """The versions of `name` whose tags have these values, oldest first."""
        query = " and ".join([f"name='{name}'", *(f"tags.{k}='{v}'" for k, v in tags.items())])
        return sorted((str(v.version) for v in self.client.search_model_versions(query)), key=int)

    def digests(self, name: str) -> dict[str, str]:
        """Every version of `name` and the digest it was registered with."""
        found = self.client.search_model_versions(f"name='{name}'")
        return {str(v.version): v.tags["digest"] for v in found if "digest" in v.tags}

    def tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(name, version).tags)

    def tag(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)

    # ---- registered-model tags -------------------------------------------------------------------

    def model_tag(self, name: str, key: str) -> str | None:
        return self.client.get_registered_model(name).tags.get(key)

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self.client.set_registered_model_tag(name, key, value)

    def delete_model_tag(self, name: str, key: str) -> None:
        """Remove the tag; one that is not there is fine."""
        if self.model_tag(name, key) is not None:
            self.client.delete_registered_model_tag(name, key)

    # ---- runs ------------------------------------------------------------------------------------

    def log_run(
        self,
        run_name: str,
        *,
        params: dict[str, object],
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: list[Path],
        experiment: str = EVALUATIONS,
    ) -> str:
        """One finished run: params and metrics in a single batch (one call, not one per metric),
        then the artifacts (files or folders). Returns the run id."""
        run_id = self.open_run(run_name, params=params, tags=tags, experiment=experiment)
        try:
            self.log_metrics(run_id, metrics)
        except Exception:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.close_run(run_id, artifacts)
        return run_id

    def open_run(
        self, run_name: str, *, params: dict[str, object], tags: dict[str, str], experiment: str
    ) -> str:
        """A run that stays open while a long job logs into it step by step (close_run ends it)."""
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags)
        run_id = run.info.run_id
        try:
            self.client.log_batch(
                run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()]
            )
        except Exception:
            self.client.set_terminated(run_id, "FAILED")
            raise
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(datetime.now(UTC).timestamp() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=metrics)

    def close_run(self, run_id: str, artifacts: list[Path], status: str = "FINISHED") -> None:
        """Log the artifacts (files or folders) and end the run; a failed upload fails the run."""
        try:
            for path in artifacts:
                if path.is_dir():
                    self.client.log_artifacts(run_id, str(path), artifact_path=path.name)
                elif path.is_file():
                    self.client.log_artifact(run_id, str(path))
        except Exception:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, status)

    def set_run_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def run_status(self, run_id: str) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(run_id).info.status

    def open_runs(self, experiment: str, filter_string: str) -> list[mlflow.entities.Run]:
        """The runs of `experiment` that match and are still running (never ended), oldest
        first."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return self.client.search_runs(
            [found.experiment_id],
            filter_string=f"{filter_string} and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time ASC"],
        )

    def finished_runs(
        self, experiment: str, filter_string: str, max_results: int
    ) -> list[mlflow.entities.Run]:
        """The finished runs of `experiment` that match, newest first."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return self.client.search_runs(
            [found.experiment_id],
            filter_string=f"{filter_string} and attributes.status = 'FINISHED'",
            max_results=max_results,
            order_by=["attributes.start_time DESC"],
        )

    def run_link(self, run_id: str, artifact: str = "") -> str:
        """Where a person opens a run: its page on a tracking server, else the artifact's path."""
        if self.uri.startswith("http"):
            experiment = self.client.get_run(run_id).info.experiment_id
            return f"{self.uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
        root = self.client.get_run(run_id).info.artifact_uri.removeprefix("file://")
        return f"{root}/{artifact}" if artifact else root

    # ---- aliases ---------------------------------------------------------------------------------

    def role(self, alias: str) -> str:
        """The registry alias that plays `alias` in this home's environment: `champion` and
        `previous` are the environment's own; any other alias is itself."""
        return {"champion": self.home.alias, "previous": self.home.previous_alias}.get(alias, alias)

    def alias(self, name: str, alias: str) -> str | None:
        """The version an alias points at (`champion`: this environment's), or None."""
        try:
            return str(self.client.get_model_version_by_alias(name, self.role(alias)).version)
        except MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str, reason: str = "") -> None:
        """Point `alias` at `version` and append the move to the alias's history."""
        alias = self.role(alias)
        self.client.set_registered_model_alias(name, alias, version)
        entry = {"version": version, "at": datetime.now(UTC).isoformat(), "reason": reason}
        history = [*self.alias_history(name, alias), entry][-HISTORY_KEEP:]
        self.client.set_registered_model_tag(name, f"alias_history.{alias}", json.dumps(history))

    def alias_history(self, name: str, alias: str) -> list[dict[str, str]]:
        try:
            raw = self.client.get_registered_model(name).tags.get(
                f"alias_history.{self.role(alias)}"
            )
        except MlflowException:
            return []
        return json.loads(raw) if raw else []

    def promote(
        self, name: str, version: str, reason: str = "", replaced_reason: str | None = None
    ) -> str | None:
        """Make `version` the champion; the champion it replaces becomes `previous` (its history
        says `replaced_reason`, by default who replaced it). Returns that one.

        `champion` moves first: it is the decision (what should be served), and a crash before
        `previous` follows leaves a reconcile that can finish it (tasks/rollout/reconcile.py)."""
        previous = self.alias(name, "champion")
        if previous == version:
            return previous
        self.set_alias(name, "champion", version, reason=reason)
        if previous:
            why = replaced_reason or f"replaced by {version}"
            self.set_alias(name, "previous", previous, reason=why)
        return previous


def first_champion(registry: Registry, name: str, versions: list[str]) -> str | None:
    """Bootstrap: with no champion yet, the first version in `versions` whose verdict passed becomes
    champion (a first release has nothing to canary against); later ones go through the rollout."""
    if registry.alias(name, "champion") is not None:
        return None
    for version in versions:
        if registry.tags(name, version).get("eval_status") == "passed":
            registry.promote(name, version, reason="first release: no champion yet")
            return version
    return None


# ---- Prefect -------------------------------------------------------------------------------------


@task(name="find-registered", cache_policy=NO_CACHE)
def find_task(home: Home, name: str, digest: str) -> RegisteredVersion | None:
    """The version already registered with this digest and its evaluation run logged: a re-run has
    nothing to redo for it. A release killed between registering and logging the evaluation left
    a version without `eval_run_id`: that one is tried and logged again (registering returns it)."""
    registry = Registry(home)
    version = registry.find(name, digest)
    if version is None or not registry.tags(name, version).get("eval_run_id"):
        return None
    return registry.registered(name, version, digest)


@task(name="first-champion", cache_policy=NO_CACHE)
def first_champion_task(home: Home, name: str, versions: list[str]) -> str | None:
    return first_champion(Registry(home), name, versions)


def registered_resource(name: str, version: str, eval_status: str) -> dict[str, str]:
    """The Prefect resource a model version is in events: automations match on its labels."""
    return {
        "prefect.resource.id": f"slipway.model.{name}.{version}",
        "prefect.resource.name": f"{name} v{version}",
        "slipway.model": name,
        "slipway.version": version,
        "slipway.eval_status": eval_status,
    }


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def register_task(
    home: Home, name: str, variant_dir: Path, digest: str, tags: dict[str, str]
) -> RegisteredVersion:
    registered = Registry(home).register(name, variant_dir, digest, tags)
    if registered.created:  # a digest registered before was announced then
        emit_event(
            REGISTERED_EVENT,
            resource=registered_resource(name, registered.version, tags.get("eval_status", "")),
            payload={
                "digest": digest,
                "model_id": registered.model_id,
                "variant": tags.get("variant"),
                "eval_reasons": tags.get("eval_reasons", ""),
                "tracking_uri": home.tracking_uri,
            },
        )
    return registered
