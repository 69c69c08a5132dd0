"""The release flow: pull a model, then for every variant sign, verify and register it in MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from configs.home import Home
from configs.models import load_model_config
from tasks.hub import pull_task
from tasks.registry import RegisteredVersion, register_task
from tasks.signing import sign_task, verify_task


@flow(name="release", log_prints=True)
def release(config_path: str = "configs/models/smollm2-135m.yaml") -> list[RegisteredVersion]:
    config = load_model_config(config_path)
    home = Home.from_env()
    root = home.models / config.name
    manifest = pull_task(config.source, root / "bf16" / "weights", home, config.allow_pickle)
    registered = []
    for variant in config.variants:
        weights = root / variant.label / "weights"
        signature = sign_task(weights, config.signing, home)
        verify_task(weights, config.signing, home)
        tags = {
            "source": manifest.source,
            "revision": manifest.revision,
            "variant": variant.label,
            "recipe": variant.recipe,
            "signer": signature.identity,
            "signature_verified": "true",
            "license": manifest.license or "unknown",
        }
        registered.append(register_task(home, config.name, weights.parent, manifest.digest, tags))
    create_markdown_artifact(summary(config.name, registered), key="release-summary")
    return registered


def summary(name: str, registered: list[RegisteredVersion]) -> str:
    rows = [
        f"| {r.version} | `{r.digest[:19]}…` | {'new' if r.created else 'already registered'} |"
        for r in registered
    ]
    return "\n".join([f"# Release of {name}", "", "| version | digest | status |", "|---|---|---|", *rows])


if __name__ == "__main__":
    for version in release(*sys.argv[1:2]):
        print(f"{version.name} v{version.version} {version.digest} {'registered' if version.created else 'unchanged'}")
