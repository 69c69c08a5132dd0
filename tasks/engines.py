"""A registered version's vLLM: started detached (it outlives its starter) and recorded in the
stack's record beside what `make up` started, so `make down` stops it whether or not the flow that
started it is still alive. `make up`, the rollout and the regression all start versions here.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.home import Home
from configs.models import Serving
from serving.processes import HOST, Proc, ProcessError, forget, read_state, record
from serving.vllm import VLLMServer, VLLMStartError
from tasks.servable import ModelVersion, check_servable


class EngineError(RuntimeError):
    """A version's vLLM did not start or stop; the message says why."""


@dataclass(frozen=True)
class RunningVersion:
    """A registered version being served: where, and whether this process started it."""

    version: ModelVersion
    url: str
    started_here: bool


def launch(version: ModelVersion, serving: Serving, home: Home) -> tuple[VLLMServer, Proc]:
    """Start vLLM on a version's weights, detached, with the record that lets `down` stop it;
    the caller records it before waiting on it. The files are verified here, in the same step
    that hands their directory to vLLM (the callers' earlier checks decide what to start; this
    one leaves only the moments of vLLM's own start for a change to slip in)."""
    check_servable(version, role="version being started")
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
    return server, proc


def start_version(version: ModelVersion, serving: Serving, home: Home) -> RunningVersion:
    """vLLM on the version's weights, recorded before it is waited on, so that a crash of the
    caller leaves it to `make down`. Raises EngineError if it never gets healthy (then nothing
    of it is left running or recorded)."""
    server, proc = launch(version, serving, home)
    record(home, proc)
    try:
        server.wait_healthy()
    except VLLMStartError as e:
        stop_version(home, proc.what)
        raise EngineError(f"the {version} server did not start: {e}") from e
    return RunningVersion(version, server.url, started_here=True)


def find_running(home: Home, version: ModelVersion) -> RunningVersion | None:
    """The version's recorded vLLM, if it answers its health check now."""
    for proc in read_state(home):
        if proc.what == version.record and proc.answers():
            return RunningVersion(version, proc.url, started_here=False)
    return None


def serve_version(version: ModelVersion, serving: Serving, home: Home) -> RunningVersion:
    """The version's recorded vLLM if it still answers (reused), else a new one: a record that
    no longer answers is stopped and replaced."""
    if (running := find_running(home, version)) is not None:
        return running
    stop_version(home, version.record)
    return start_version(version, serving, home)


def stop_version(home: Home, name: str, grace_s: float = 20) -> bool:
    """Stop the recorded vLLM named `name` and forget it; False if none was recorded."""
    try:
        return forget(home, name, grace_s)
    except ProcessError as e:
        raise EngineError(str(e)) from e
