"""The release fanned out over a work pool, against a real Prefect server on PostgreSQL (a fresh
database) with two process workers on one pool, each running one flow run at a time, and the
release-variant deployment of prefect.yaml. The deployment's flow is tests/flows/variant_probe.py:
the real flow and tasks, the trial task's hold on the `gpu` concurrency limit included, with a
stand-in inside the trial instead of vLLM; it records the worker and the time it held its slot.

- two slots: the release's variants run as flow runs on both workers, trials at the same time;
- one slot (a CPU machine's): the same two flow runs start together and their trials take turns;
- a worker and its flow killed -9 mid-trial: nothing frees the slot until its lease expires (a
  minute, the server's shortest), then the other worker's run gets it.

Stress tests: on a busy 2-core machine each flow run's process takes most of a minute to start.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from configs.home import REPO
from configs.models import DirSource, load_model_config
from serving.processes import Proc, free_port, stop
from serving.stack.prefect_server import PrefectStack, deploy, start_worker
from tasks.gpu_slot import GPU_LIMIT, slots_here
from tasks.hub import pull
from tasks.store import Store

pytestmark = [pytest.mark.stress, pytest.mark.slow]  # minutes: each flow run starts a process

WORKERS = ("slipway-a", "slipway-b")
TWINS = ("twin-a", "twin-b")
LEASE_S = 60  # the shortest lease Prefect's server grants
CONFIG = """\
name: tiny
source: {source}
variants:
  - recipe: bf16
  - {{recipe: bf16, name: twin-a}}
  - {{recipe: bf16, name: twin-b}}
"""


def eventually(check: Callable[[], Any], what: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.5)
    return found


@dataclass(frozen=True)
class Pool:
    config: Path
    base: str  # the stored base's digest
    probe: Path
    workers: dict[str, Proc]

    def hold(self, **seconds: float) -> None:
        """How long each variant's stand-in trial holds its slot."""
        (self.probe / "trial_s.json").write_text(json.dumps(seconds))

    def held(self) -> dict[str, dict]:
        """The stand-in trials so far, by flow run id."""
        return {p.stem: json.loads(p.read_text()) for p in self.probe.glob("*-*.json")}

    def gpu(self):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(GPU_LIMIT)

    def slots(self, limit: int) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        with get_client(sync_client=True) as client:
            client.update_global_concurrency_limit(
                GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=limit)
            )

    def twin_runs(self) -> list[dict[str, Any]]:
        """The release-variant parameters of the two twins (bf16 copies of the stored base)."""
        config = load_model_config(self.config)
        return [
            {"config": config, "variant": v, "base": self.base, "baseline": None}
            for v in config.variants
            if v.label in TWINS
        ]


@pytest.fixture
def pool(home, tiny_model, pg_url, tmp_path, monkeypatch) -> Iterator[Pool]:
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    probe = tmp_path / "probe"
    probe.mkdir()
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.format(source=tiny_model))
    base, _ = pull(DirSource(path=tiny_model), Store(home, "tiny"), home)
    prefect = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [variant] = [d for d in prefect["deployments"] if d["name"] == "release-variant"]
    variant["entrypoint"] = "tests/flows/variant_probe.py:release_variant"
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump({**prefect, "deployments": [variant]}))
    # The server (on PostgreSQL), the workers and their flows all inherit these.
    database = pg_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", database)
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "1")  # lease sweeps
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
    monkeypatch.setenv("SLIPWAY_GPU_SLOT_LEASE_S", str(LEASE_S))
    monkeypatch.setenv("SLIPWAY_HARDWARE", "cpu")
    monkeypatch.setenv("SLIPWAY_PROBE_DIR", str(probe))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    procs: list[Proc] = []
    # The flows' results are shared through the home's storage, as under `make up`.
    here = {PREFECT_API_URL: api, PREFECT_LOCAL_STORAGE_PATH: home.prefect / "storage"}
    try:
        with temporary_settings(here):
            PrefectStack(port, prefect_file, auto_rollout=False).start_server(home, procs, print)()
            for name in WORKERS:
                start_worker(home, api, home.tracking_uri, procs, print, name=name, limit=1)
            deploy(home, api, prefect_file)
            workers = {name: p for name, p in zip(WORKERS, procs[1:], strict=True)}
            yield Pool(config, base.digest, probe, workers)
    finally:
        stop(procs, 10)


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_variants_fan_out_over_two_workers_and_their_trials_take_the_gpu_slots(pool):
    from prefect.client.orchestration import get_client

    from flows.release import VARIANT_DEPLOYMENT, release
    from tasks.deployment_runs import run_all

    assert pool.gpu().limit == slots_here()  # made by the deploy, sized to this machine

    pool.slots(2)
    pool.hold(**{"bf16": 1, "twin-a": 15, "twin-b": 15})
    outcomes = release(str(pool.config), fan_out=True)

    labels = ["bf16", *TWINS]
    assert [(o.variant.label, o.status, o.reason) for o in outcomes] == [
        (label, "failed", f"{label}: stand-in trial") for label in labels
    ]
    held = pool.held()
    assert sorted(h["variant"] for h in held.values()) == labels  # each in its own flow run
    twins = {h["variant"]: (run_id, h) for run_id, h in held.items() if h["variant"] in TWINS}
    # The twins started together, one on each worker, and held a slot each at the same time.
    assert {h["worker"] for _, h in twins.values()} == set(WORKERS)
    with get_client(sync_client=True) as client:
        for run_id, h in twins.values():
            assert client.read_flow_run(run_id).labels["prefect.worker.name"] == h["worker"]
    assert overlap(twins["twin-a"][1], twins["twin-b"][1])
    assert pool.gpu().active_slots == 0

    # One slot: both flow runs run at once, on the two workers, but their trials take turns.
    pool.slots(1)
    pool.hold(**{"twin-a": 5, "twin-b": 5})
    before = set(held)
    again = run_all(VARIANT_DEPLOYMENT, pool.twin_runs())
    assert [o.reason for o in again] == [f"{t}: stand-in trial" for t in TWINS]
    turns = sorted(
        ((run_id, h) for run_id, h in pool.held().items() if run_id not in before),
        key=lambda item: item[1]["start"],
    )
    [(_, first), (second_id, second)] = turns
    assert {first["worker"], second["worker"]} == set(WORKERS)
    assert first["end"] <= second["start"]
    with get_client(sync_client=True) as client:
        started = client.read_flow_run(second_id).start_time.timestamp()
    assert started < first["end"]  # the second waited for the slot, not for a worker
    assert pool.gpu().active_slots == 0


def test_a_killed_workers_slot_comes_back_when_its_lease_runs_out(pool):
    from prefect.deployments import run_deployment

    from flows.release import VARIANT_DEPLOYMENT

    pool.slots(1)
    pool.hold(**{"twin-a": 600, "twin-b": 1})
    stuck, waiting = pool.twin_runs()

    run = run_deployment(VARIANT_DEPLOYMENT, parameters=stuck, timeout=0)
    held = eventually(lambda: pool.held().get(str(run.id)), "the first trial holds the slot")
    assert pool.gpu().active_slots == 1
    os.killpg(pool.workers[held["worker"]].pgid, signal.SIGKILL)  # the worker, then its flow
    os.kill(held["pid"], signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(5)
    assert pool.gpu().active_slots == 1  # nothing released it: its lease still runs

    eventually(lambda: pool.gpu().active_slots == 0, "the lease expired", timeout_s=LEASE_S + 30)
    assert time.monotonic() - killed > LEASE_S - 15  # not before the lease's minute was up
    [alive] = set(WORKERS) - {held["worker"]}
    after = run_deployment(VARIANT_DEPLOYMENT, parameters=waiting, timeout=180)
    assert after.state.is_completed(), after.state
    assert after.state.result().reason == "twin-b: stand-in trial"
    assert pool.held()[str(after.id)]["worker"] == alive
    assert pool.gpu().active_slots == 0
