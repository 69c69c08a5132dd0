"""The long-running services `make up` starts beside the models (MLflow, Prefect, monitoring),
each reused when something already answers on its port, and the shared wording of the stack's
messages."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from configs.home import REPO, Home
from configs.settings import Settings
from serving.processes import (
    HOST,
    NotAnswering,
    Proc,
    answers,
    launch,
    members,
    wait_answering,
    write_state,
)

LEFT = "What already started keeps running: `make status` shows it, `make down` stops it."
PREFECT_SERVER, PREFECT_WORKER = "prefect server", "prefect worker"
PROMETHEUS, ALERTMANAGER, INCIDENT_WEBHOOK = "prometheus", "alertmanager", "incident webhook"
# A second `up` keeps these when they run.
REUSED = ("mlflow", PREFECT_SERVER, PREFECT_WORKER, PROMETHEUS, ALERTMANAGER, INCIDENT_WEBHOOK)


class StackError(RuntimeError):
    """The stack cannot do what was asked; the message says why and what to do next."""


def display(path: Path) -> str:
    """A path as the user can type it from the current directory."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def wait_up(proc: Proc, popen, timeout_s: float) -> None:
    """Wait until `proc` answers its health path; StackError (with its log) if it never does."""
    try:
        wait_answering(proc.url + proc.health, popen, timeout_s, proc.what, Path(proc.log))
    except NotAnswering as e:
        raise StackError(f"{e}\n{LEFT}") from None


def ensure_service(
    home: Home,
    what: str,
    command: list[str],
    port: int,
    health: str,
    procs: list[Proc],
    say: Callable[[str], None],
    label: str,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 180,
) -> Callable[[], None]:
    """Start `command` unless something answers `health` on `port` already (ours, recorded in
    `procs` by an earlier `up`, or not); a start is appended to `procs` and recorded. Returns the
    wait until it answers, so that services start side by side."""
    url = f"http://{HOST}:{port}"
    if answers(url + health):
        ours = any(p.what == what and p.port == port and members(p) for p in procs)
        owner = "" if ours else "; not started by `make up`, so `make down` leaves it running"
        say(f"{label:<9} {url}  (already running{owner})")
        return lambda: None
    log = home.logs / f"{what.replace(' ', '-')}.log"
    proc, popen = launch(what, command, log, port, health, home, env)
    procs.append(proc)
    write_state(home, procs)  # before the wait: an interrupted `up` leaves it to `down`

    def wait() -> None:
        wait_up(proc, popen, timeout_s)
        say(f"{label:<9} {url}  (log {display(log)})")

    return wait


def ensure_mlflow(
    home: Home, port: int, procs: list[Proc], say: Callable[[str], None]
) -> Callable[[], None]:
    """The lean MLflow server, unless one answers on `port`; returns the wait until it answers.
    Its artifacts go where SLIPWAY_ARTIFACT_ROOT says (checked here, before anything starts)."""
    command = [str(REPO / "mlflow" / "start.sh"), "--port", str(port)]
    root = Settings().artifact_root
    env = {"SLIPWAY_ARTIFACT_ROOT": root} if root else None
    return ensure_service(home, "mlflow", command, port, "/health", procs, say, "MLflow:", env)
