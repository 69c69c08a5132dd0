"""Helpers for killing a rollout or revert flow at a chosen stage: a gateway wrapper that holds
one admin call (the flow is killed while it waits for the answer), the flow run as its own
process against the session's Prefect server, and the checks that the stack is in one of the two
consistent states with records that say which."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import mlflow
import pytest
from click.testing import CliRunner
from prefect.client.orchestration import get_client

from configs.home import REPO, Home
from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from flows.cli import cli
from serving.gateway.app import build_app
from tasks.registry import Registry
from tasks.rollout.inflight import IN_FLIGHT, InFlight
from tests.flows.test_rollout import BASE_DELAY_S, CHUNK_DELAY_S, Stage, registered
from tests.releases import stable_backend
from tests.serving.conftest import MODEL, Secrets

Matcher = Callable[[str, str, dict[str, Any]], bool]  # (method, path, JSON body)


class Hold:
    """An ASGI wrapper round the gateway that catches the first admin call `matches` accepts:
    `apply` lets the gateway apply it and holds its answer back, `hold` holds it unapplied (the
    flow waits for the answer until it is killed), `refuse` answers 503 without applying it.
    `reached` says when it caught the call."""

    def __init__(self, app: Any, matches: Matcher = lambda *_: False, mode: str = "apply") -> None:
        self.app, self.matches, self.mode = app, matches, mode
        self.reached = threading.Event()
        self.released = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.reached.is_set():
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        if not self.matches(scope["method"], scope["path"], json.loads(body) if body else {}):
            return await self.app(scope, replay, send)
        self.reached.set()
        if self.mode == "refuse":
            error = json.dumps({"error": {"message": "unavailable (test)"}}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": []})
            return await send({"type": "http.response.body", "body": error})
        held: list[dict] = []

        async def keep(message: dict) -> None:
            held.append(message)

        if self.mode == "apply":
            await self.app(scope, replay, keep)
        while not self.released.is_set():  # the caller is killed meanwhile
            await asyncio.sleep(0.05)
        for message in held:
            await send(message)


@dataclass
class Killable:
    """The rollout tests' stage (v1 champion served from the mock upstream, v2 registered) with
    a hold on one admin call of its gateway."""

    stage: Stage
    hold: Hold

    def arm(self, matches: Matcher, mode: str) -> Hold:
        self.hold.matches, self.hold.mode = matches, mode
        return self.hold


@contextmanager
def staged(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **gateway: Any
) -> Iterator[Killable]:
    """`gateway`: more fields of the gateway's config (e.g. breaker, more tenants)."""
    registry = Registry(home)
    stable = registered(home, tmp_path, b"stable", "bf16")
    registry.promote(MODEL, stable)
    candidate = registered(home, tmp_path, b"candidate", "gptq-w8a8")
    upstream = MockUpstream(chunks=4, chunk_delay_s=CHUNK_DELAY_S)
    upstream.record = False
    for version in (stable, candidate):
        upstream.faults[f"{MODEL}-v{version}"] = Fault(delay_s=BASE_DELAY_S)
    keys = Secrets()
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    with serve(upstream) as upstream_url:
        backend = stable_backend(home, MODEL, stable, upstream_url)
        tenants = [keys.tenant("alice"), *(keys.tenant(**t) for t in gateway.pop("tenants", []))]
        config = keys.config([backend], tenants=tenants, **gateway)
        hold = Hold(build_app(config, home))
        with serve(hold) as gateway_url:
            stage = Stage(
                home,
                registry,
                upstream,
                upstream_url,
                gateway_url,
                keys.key("alice"),
                stable,
                candidate,
                _admin=keys.admin,
            )
            try:
                yield Killable(stage, hold)
            finally:
                hold.released.set()


def routed(stage: Stage) -> list[tuple[str, str, float]]:
    return [(b["version"], b["role"], b["weight"]) for b in stage.route()["backends"]]


def reconcile_by_hand(stage: Stage) -> str:
    """`slipway rollout reconcile MODEL`; its output."""
    result = CliRunner().invoke(
        cli, ["rollout", "reconcile", MODEL, "--gateway-url", stage.gateway_url]
    )
    assert result.exit_code == 0, result.output
    return result.output


def weights_call(model: str, weights: dict[str, float]) -> Matcher:
    """The weights POST that sets exactly these weights."""

    def matches(method: str, path: str, body: dict[str, Any]) -> bool:
        return (
            method == "POST"
            and path == f"/admin/routes/{model}/weights"
            and body.get("weights") == weights
        )

    return matches


def route_call(model: str, versions: list[str]) -> Matcher:
    """The route PUT that leaves exactly these versions."""

    def matches(method: str, path: str, body: dict[str, Any]) -> bool:
        given = [b["version"] for b in body.get("backends", [])]
        return method == "PUT" and path == f"/admin/routes/{model}" and given == versions

    return matches


def start_flow(home: Home, log: Path, *args: str) -> subprocess.Popen:
    """`slipway ARGS` as its own process (group), against the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "SLIPWAY_HOME": str(home.root),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": str(REPO),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_when(
    proc: subprocess.Popen, reached: Callable[[], bool], log: Path, timeout_s: float = 120
) -> float:
    """SIGKILL the flow's process group once `reached()`; the seconds until then. Fails if the
    flow ends first or the stage never comes."""
    start = time.monotonic()
    while not reached():
        assert proc.poll() is None, f"the flow ended ({proc.returncode}): {log.read_text()[-3000:]}"
        assert time.monotonic() - start < timeout_s, f"stage not reached: {log.read_text()[-3000:]}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.monotonic() - start


def in_flight(registry: Registry, model: str) -> InFlight:
    claim = InFlight.read(registry, model)
    assert claim is not None, "the killed flow left no in-flight record"
    return claim


def flow_run_state(flow_run_id: str) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id)).state.type.value


def story(registry: Registry, run_id: str) -> str:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="story.md", tracking_uri=registry.uri
    )
    return Path(path).read_text()


def assert_settled(registry: Registry, model: str, killed: InFlight) -> None:
    """The killed flow's records are settled: no move in flight, its MLflow run ended with a
    story of the repair, and its Prefect flow run no longer holds a slot."""
    assert registry.model_tag(model, IN_FLIGHT) is None
    run = registry.client.get_run(killed.run_id)
    assert run.info.status == "KILLED", run.info.status
    told = story(registry, killed.run_id)
    assert "repaired after the flow stopped" in told and killed.owner.host in told, told
    assert flow_run_state(str(killed.owner.flow_run_id)) == "CRASHED"
