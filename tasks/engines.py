"""A registered version's vLLM: started detached (it outlives its starter) and recorded in the
stack's record beside what `make up` started, so `make down` stops it whether or not the flow that
started it is still alive. `make up`, the rollout and the regression all start versions here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from configs.home import Home
from configs.models import Serving
from serving.processes import HOST, Proc, ProcessError, forget, read_state, record
from serving.vllm import VLLMServer, VLLMStartError
from tasks.servable import ModelVersion, check_servable


class EngineError(RuntimeError):
    """A version's vLLM did not start or stop; the message says why."""


@dataclass(frozen=True)
class RunningVersion:
    """A registered version being served: where (one URL per replica), and whether this process
    started it."""

    version: ModelVersion
    urls: tuple[str, ...]
    started_here: bool

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def servers(self) -> dict[str, Any]:
        """Its servers as a gateway backend names them."""
        return {"url": self.urls[0], "replicas": list(self.urls[1:])}


def launch(version: ModelVersion, serving: Serving, home: Home) -> list[tuple[VLLMServer, Proc]]:
    """Start `serving.replicas` vLLM servers on a version's weights, detached, each with the
    record that lets `down` stop it (one name for all: the version's); the caller records them
    before waiting on them. The files are verified here, in the same step that hands their
    directory to vLLM (the callers' earlier checks decide what to start; this one leaves only
    the moments of vLLM's own start for a change to slip in)."""
    check_servable(version, role="version being started")
    started = []
    for _ in range(serving.replicas):
        server = VLLMServer(
            version.weights,
            version.model,
            home,
            serving,
            [version.served_name],
            host=HOST,
            detach=True,
        ).start()
        proc = Proc.of(version.record, server.pid, server.port, "/health", server.log_path)
        started.append((server, proc))
    return started


def start_version(version: ModelVersion, serving: Serving, home: Home) -> RunningVersion:
    """vLLM on the version's weights (its replicas), recorded before they are waited on, so that
    a crash of the caller leaves them to `make down`. Raises EngineError if one never gets
    healthy (then nothing of the version is left running or recorded)."""
    started = launch(version, serving, home)
    for _, proc in started:
        record(home, proc)
    try:
        for server, _ in started:
            server.wait_healthy()
    except VLLMStartError as e:
        stop_version(home, version.record)
        raise EngineError(f"the {version} server did not start: {e}") from e
    return RunningVersion(version, tuple(s.url for s, _ in started), started_here=True)


def find_running(home: Home, version: ModelVersion) -> RunningVersion | None:
    """The version's recorded vLLM servers that answer their health check now, if any."""
    urls = tuple(p.url for p in read_state(home) if p.what == version.record and p.answers())
    return RunningVersion(version, urls, started_here=False) if urls else None


def serve_version(version: ModelVersion, serving: Serving, home: Home) -> RunningVersion:
    """The version's recorded vLLM servers if they all still answer (reused), else new ones:
    records that no longer answer, or fewer than `serving.replicas`, are stopped and replaced."""
    running = find_running(home, version)
    if running is not None and len(running.urls) == serving.replicas:
        return running
    stop_version(home, version.record)
    return start_version(version, serving, home)


def stop_version(home: Home, name: str, grace_s: float = 20) -> bool:
    """Stop the recorded vLLM servers named `name` (every replica) and forget them; False if none
    was recorded."""
    try:
        return forget(home, name, grace_s)
    except ProcessError as e:
        raise EngineError(str(e)) from e
