"""The Prefect half of `make up`: the server, a process worker, the deployments of prefect.yaml and
the optional auto-rollout automation. serving/stack/operator.py calls it and records what it starts.

The server keeps its database under $SLIPWAY_HOME/prefect (sqlite) or wherever
PREFECT_API_DATABASE_CONNECTION_URL points (PostgreSQL, the production profile). The worker is
started first and creates the process work pool itself; once the pool reports READY (the worker
polls), `prefect deploy` registers the deployments and their cron schedules, and the `gpu`
concurrency limit the release's trials hold a slot of is made (tasks/gpu_slot.py). Flows the worker
starts inherit its environment: PREFECT_API_URL, MLFLOW_TRACKING_URI (the stack's MLflow server),
SLIPWAY_HOME, SLIPWAY_ENVIRONMENT (configs/environments/; the rollout deployment's `environment`
parameter too) and SLIPWAY_REPO, the checkout that prefect.yaml's pull step changes into.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
from prefect.client.schemas.objects import WorkPoolStatus
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from configs.home import REPO, Home
from serving.processes import HOST, Proc, free_port, launch, write_state
from serving.stack.services import (
    LEFT,
    PREFECT_SERVER,
    PREFECT_WORKER,
    StackError,
    display,
    ensure_service,
    wait_up,
)
from tasks import auto_rollout
from tasks.gpu_slot import ensure_gpu_limit

POOL = "slipway-process"
WORKER = "slipway-local"  # `make up`'s worker


@dataclass(frozen=True)
class PrefectStack:
    """What `make up` asks of Prefect: the server's port, the deployments file, the automation."""

    port: int
    prefect_file: Path
    auto_rollout: bool

    def start_server(
        self, home: Home, procs: list[Proc], say: Callable[[str], None]
    ) -> Callable[[], None]:
        """`prefect server start` unless one answers on the port; returns the wait for it."""
        command = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]
        return ensure_service(
            home,
            PREFECT_SERVER,
            command,
            self.port,
            "/api/health",
            procs,
            say,
            "Prefect:",
            server_env(home),
            timeout_s=120,
        )

    def start_worker_and_deploy(
        self, home: Home, mlflow_url: str, procs: list[Proc], say: Callable[[str], None]
    ) -> None:
        """On the server: a worker (kept when an earlier `up` started one that still runs), the
        deployments, the automation; a start is appended to `procs` and recorded."""
        api = f"http://{HOST}:{self.port}/api"
        if kept := [p for p in procs if p.what == PREFECT_WORKER]:
            say(f"Worker:   pool {POOL} (already running, log {display(Path(kept[0].log))})")
        else:
            start_worker(home, api, mlflow_url, procs, say)
        deployed = deploy(home, api, self.prefect_file)
        say(f"Prefect:  {apply_auto_rollout(api, self.auto_rollout)}")
        say(how_to_run(api, deployed))


def server_env(home: Home) -> dict[str, str]:
    """Prefect's home, results and settings under Slipway's home, never ~/.prefect."""
    return {
        "PREFECT_HOME": str(home.prefect),
        "PREFECT_LOCAL_STORAGE_PATH": str(home.prefect / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def start_worker(
    home: Home,
    api: str,
    mlflow_url: str,
    procs: list[Proc],
    say: Callable[[str], None],
    name: str = WORKER,
    limit: int | None = None,
) -> None:
    """A process worker on POOL (created by the worker if missing), recorded in `procs` before it
    is waited on; returns once the pool is READY, i.e. the worker has polled the server. `limit`:
    the flow runs it runs at once (None: any number); a worker per machine that takes one at a
    time leaves the pool's other runs to the other machines' workers."""
    health_port = free_port()
    env = server_env(home) | {
        "PREFECT_API_URL": api,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "SLIPWAY_REPO": str(REPO),
        # The healthcheck answers `make status`; on loopback, on a port of its own.
        "PREFECT_WORKER_WEBSERVER_HOST": HOST,
        "PREFECT_WORKER_WEBSERVER_PORT": str(health_port),
    }
    command = [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        POOL,
        "--type",
        "process",
        "--name",
        name,
        "--with-healthcheck",
        *(["--limit", str(limit)] if limit else []),
    ]
    log = home.logs / ("prefect-worker.log" if name == WORKER else f"prefect-worker-{name}.log")
    worker, popen = launch(PREFECT_WORKER, command, log, health_port, "/health", home, env=env)
    procs.append(worker)
    write_state(home, procs)
    wait_up(worker, popen, timeout_s=90)
    wait_pool_ready(api, worker, popen, timeout_s=90)
    say(f"Worker:   pool {POOL} (type process, log {display(log)})")


def wait_pool_ready(
    api: str, worker: Proc, popen: subprocess.Popen[bytes], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        while True:
            try:
                if client.read_work_pool(POOL).status == WorkPoolStatus.READY:
                    return
            except ObjectNotFound:
                pass  # the worker creates it on its first poll
            if popen.poll() is not None or time.monotonic() > deadline:
                raise StackError(
                    f"the worker never reported pool {POOL} ready; log {worker.log}. {LEFT}"
                )
            time.sleep(0.5)


def deploy(home: Home, api: str, prefect_file: Path) -> list[Deployed]:
    """`prefect deploy --all` from the checkout, and the `gpu` concurrency limit; returns what is
    deployed on POOL."""
    log = home.logs / "prefect-deploy.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--all",
        "--prefect-file",
        str(prefect_file),
    ]
    env = {**os.environ, **server_env(home), "PREFECT_API_URL": api, "SLIPWAY_HOME": str(home.base)}
    env["SLIPWAY_ENVIRONMENT"] = home.environment or "base"  # prefect.yaml's rollout parameter
    with log.open("w") as out:
        done = subprocess.run(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    if done.returncode != 0:
        raise StackError(
            f"`prefect deploy --all` failed (status {done.returncode}); see {display(log)}. {LEFT}"
        )
    with temporary_settings({PREFECT_API_URL: api}):
        ensure_gpu_limit()  # the slots the workers' trials hold, one per GPU of this machine
    return deployments(api)


@dataclass(frozen=True)
class Deployed:
    """A deployment on POOL as `prefect deployment run` names it (flow/deployment), with the
    parameters a run must be given and its cron schedules."""

    name: str
    required: list[str]
    crons: list[str]

    def how_to_run(self, prefect: str) -> str:
        given = "".join(f" -p {p}=<{p}>" for p in self.required)
        when = f"  # also {', '.join(self.crons)}" if self.crons else ""
        return f"  {prefect} deployment run '{self.name}'{given}{when}"


def deployments(api: str) -> list[Deployed]:
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        found = client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL]))
        )
        flows = {f.id: f.name for f in client.read_flows()}
    return sorted(
        (
            Deployed(
                f"{flows[d.flow_id]}/{d.name}",
                list(d.parameter_openapi_schema.get("required", [])),
                [f"cron {s.schedule.cron} {s.schedule.timezone}" for s in d.schedules],
            )
            for d in found
        ),
        key=lambda d: d.name,
    )


def apply_auto_rollout(api: str, enabled: bool) -> str:
    with temporary_settings({PREFECT_API_URL: api}):
        try:
            return auto_rollout.apply(enabled)
        except LookupError as e:
            raise StackError(f"{e}. {LEFT}") from None


def how_to_run(api: str, deployed: list[Deployed]) -> str:
    prefect = display(Path(sys.executable).parent / "prefect")
    runs = "\n".join(d.how_to_run(prefect) for d in deployed)
    ui = api.removesuffix("/api")
    return f"""Deployments on pool {POOL} (runs in the Prefect UI at {ui}, reports in MLflow):
  export PREFECT_API_URL={api}
{runs}
  (-p name=value sets any other parameter, e.g. -p config_path=configs/models/other.yaml)"""
