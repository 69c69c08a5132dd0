"""Crash and resume: the release flow SIGKILLed at its stages, then run again until it finishes.

The flow runs as its own process (`slipway release`) against the session's Prefect server;
the test watches its task runs through the Prefect API and kills the process group when a stage
is reached: during the bf16 trial (evaluation), right after the bf16 registration (before its
evaluation run is logged), and during the fp8 build (quantize). The last run must finish with every
variant registered once with its evaluation run, the completed stages not redone (the pull reuses
the stored base, a variant registered and logged is not served again), and nothing of the
killed runs left behind: no process, no staging directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from configs.home import REPO
from serving.attestation import verify
from tasks.attest import policy
from tasks.registry import Registry
from tasks.signing import keygen
from tasks.store import Store
from tests.releases import attestation_of

pytestmark = [pytest.mark.stress, pytest.mark.slow]

CONFIG = """\
name: tiny
source: {source}
variants:
  - recipe: bf16
  - recipe: fp8-dynamic
smoke: {{prompt: "The capital of France is", expect: Paris}}
serving: {{engine_args: [--max-model-len, "256"]}}
evaluation:
  suites: [slipway_knowledge, slipway_perplexity]
  limit: 4
  loadgen: {{mode: synchronous, num_prompts: 2, warmup: 1, max_tokens: 4, max_prompt_chars: 200}}
gates:
  min_recovery: 0.5
  max_perplexity_increase: 1.0
"""


@dataclass(frozen=True)
class Stage:
    """Where to kill: a task (by name) of one variant's subflow, once it is in `state`."""

    task: str
    variant: str
    state: str  # RUNNING: in the middle of it; COMPLETED: at the boundary after it


async def task_states(since: float) -> list[tuple[str, str, str, str]]:
    """(flow run name, task name, state type, state name) of the task runs of the flow runs started
    after `since`; a variant's subflow run is named after the variant."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterStartTime,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    after = FlowRunFilter(
        start_time=FlowRunFilterStartTime(after_=datetime.fromtimestamp(since, UTC))
    )
    async with get_client() as client:
        flows = {
            f.id: f.name for f in await client.read_flow_runs(flow_run_filter=after, limit=200)
        }
        if not flows:
            return []
        runs = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=list(flows))),
            limit=200,
        )
    return [
        (flows[t.flow_run_id], t.name.rsplit("-", 1)[0], t.state_type.value, t.state_name)
        for t in runs
        if t.state_type
    ]


def start_release(config: Path, home, log: Path) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "SLIPWAY_HOME": str(home.root),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "SLIPWAY_HARDWARE": "cpu",
        "PYTHONPATH": str(REPO),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "release", str(config)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def leftovers(home) -> list[psutil.Process]:
    """Live processes, other than this one, started for this SLIPWAY_HOME (found by environment:
    vLLM renames its workers)."""
    found = []
    for p in psutil.process_iter():
        try:
            ours = p.environ().get("SLIPWAY_HOME") == str(home.root)
            if ours and p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def run_until(
    config: Path, home, log: Path, stage: Stage | None, orphans: list[str], timeout_s: float = 1500
) -> list[tuple]:
    """Run the release; SIGKILL its process group at `stage` (None: let it finish). Returns the
    task states of this run. Processes of the killed run still alive 60 s later are ended and
    named in `orphans`. Fails if the stage is never reached."""
    since = time.time()
    proc = start_release(config, home, log)
    deadline = time.monotonic() + timeout_s
    while True:
        states = asyncio.run(task_states(since))
        if stage and (stage.variant, stage.task, stage.state) in {s[:3] for s in states}:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _, alive = psutil.wait_procs(leftovers(home), timeout=60)
            for p in alive:  # ours, started by the killed flow: end them and report them
                orphans.append(f"{p.name()} (after the kill {stage})")
                p.kill()
            return states
        if proc.poll() is not None:
            assert stage is None, (
                f"the flow ended ({proc.returncode}) before {stage}: {log.read_text()[-3000:]}"
            )
            assert proc.returncode == 0, log.read_text()[-3000:]
            return asyncio.run(task_states(since))
        assert time.monotonic() < deadline, (
            f"no {stage} within {timeout_s} s: {log.read_text()[-3000:]}"
        )
        time.sleep(0.2)


@pytest.mark.timeout(5400)
def test_killed_at_each_stage_then_resumed(prefect_server, home, tiny_model, tmp_path):
    keygen(home)
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.format(source=tiny_model))
    log = tmp_path / "release.log"
    registry = Registry(home)
    orphans: list[str] = []

    def versions() -> list[str]:
        return sorted(str(v.version) for v in registry.client.search_model_versions("name='tiny'"))

    run_until(config, home, log, Stage("trial", "bf16", "RUNNING"), orphans)
    assert versions() == []
    run_until(config, home, log, Stage("register", "bf16", "COMPLETED"), orphans)
    assert versions() == ["1"]
    # The kill lands between registering and logging the evaluation run, or (polling is not
    # instant) just after the logging: the version is complete or lacks its `eval_run_id`.
    logged = bool(registry.tags("tiny", "1").get("eval_run_id"))
    third = run_until(config, home, log, Stage("quantize", "fp8-dynamic", "RUNNING"), orphans)
    # A version without its evaluation run is tried and logged again (on the same version); a
    # complete one is not served again.
    redone = {s[:2] for s in third if s[2] == "COMPLETED"}
    assert (("bf16", "trial") in redone, ("bf16", "log-evaluation") in redone) == (not logged,) * 2
    assert versions() == ["1"]
    last = run_until(config, home, log, None, orphans)

    assert versions() == ["1", "2"]  # each variant once, whatever the kills
    # Every run resolves its source again (no Prefect cache on pull), and the store reuses what
    # the first run stored: one base and one variant, whatever the kills.
    assert [s[3] for s in last if s[1] == "pull"] == ["Completed"]
    assert len(Store(home, "tiny").entries()) == 2
    assert not [s for s in last if s[:2] == ("bf16", "trial")]
    # The base passes as the reference; each version's verdict is the one its signed evaluation
    # attestation states (the killed runs left no second, different verdict).
    assert registry.tags("tiny", "1")["eval_status"] == "passed"
    for version in ("1", "2"):
        tags = registry.tags("tiny", version)
        attested = verify(attestation_of(home, "tiny", version), policy(home)).predicate
        assert tags["signature_verified"] == "true"
        assert tags["eval_status"] == attested["verdict"], (tags, attested)
        assert tags.get("eval_run_id"), f"version {version} lost its evaluation run: {tags}"
    assert registry.alias("tiny", "champion") == "1"
    staging = home.models / "tiny" / ".staging"  # the store keeps this folder, empty
    debris = [p.name for p in (home.models / "tiny").rglob(".*") if p != staging]
    debris += [p.name for p in staging.iterdir()]
    assert not debris, f"staging left by the killed runs: {debris}"
    assert not orphans, f"processes of killed runs still running 60 s after the kill: {orphans}"
