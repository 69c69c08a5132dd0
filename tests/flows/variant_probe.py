"""The release-variant flow for the fan-out tests, deployed in its place: the real flow and tasks,
the trial task's accelerator slot included, with only the trial's inside (serving with vLLM and
measuring) replaced by a stand-in. The stand-in records, in $SLIPWAY_PROBE_DIR/<flow run id>.json,
which worker ran it and when it held the slot, holds it for the seconds trial_s.json gives its
variant, and then fails as a trial that could not serve would."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from configs.home import Home
from configs.models import ModelConfig, Variant
from flows.release import release_variant
from tasks import evaluate

__all__ = ["release_variant"]  # the deployment's entrypoint


def stand_in(model_dir: Path, config: ModelConfig, variant: Variant, home: Home) -> evaluate.Trial:
    probe = Path(os.environ["SLIPWAY_PROBE_DIR"])
    record = probe / f"{os.environ['PREFECT__FLOW_RUN_ID']}.json"
    held = {
        "variant": variant.label,
        "worker": os.environ["PREFECT__WORKER_NAME"],
        "pid": os.getpid(),
        "start": time.time(),
    }
    write(record, held)
    time.sleep(json.loads((probe / "trial_s.json").read_text())[variant.label])
    write(record, held | {"end": time.time()})
    raise evaluate.TrialError(f"{variant.label}: stand-in trial")


def write(record: Path, held: dict) -> None:
    """Whole or not at all: the test reads the records while the trials run."""
    partial = record.with_suffix(".partial")
    partial.write_text(json.dumps(held))
    partial.replace(record)


evaluate.trial = stand_in
