"""A small real flow for the production-profile test, deployed from the checkout and run by the
worker that `make up` starts: it records the environment the worker gave it, then registers a
version through the real register task (MLflow over HTTP, the Prefect event), makes it champion."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow

from configs.home import Home
from tasks.registry import first_champion_task, register_task

SEEN = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "SLIPWAY_HOME", "SLIPWAY_REPO")


@flow(name="profile-probe")
def probe(out: str, variant_dir: str, model: str, digest: str) -> str:
    seen = {key: os.environ.get(key) for key in SEEN} | {"cwd": os.getcwd()}
    Path(out).write_text(json.dumps(seen))
    home = Home.from_env()
    registered = register_task(home, model, Path(variant_dir), digest, {"eval_status": "passed"})
    first_champion_task(home, model, [registered.version])
    return registered.version
