"""Process groups that outlive their starter, and the record of them that `make down` reads.

Every server Slipway starts (MLflow, Prefect, vLLM, the gateway) runs in its own process group,
so that stopping it leaves no child behind. Detached ones are recorded in
$SLIPWAY_HOME/run/stack.json, written whole and swapped in (`down` never reads half a record).
A record knows its leader's start time, so a pid that the system reused for another process is
never signalled. Health is one GET answered 200, polled until it answers or the process dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from configs.home import REPO, Home

HOST = "127.0.0.1"
TAIL_LINES = 30


class ProcessError(RuntimeError):
    """A process did not start or stop as asked; the message quotes the tail of its log."""


class NotAnswering(ProcessError):
    """A process exited (`exit_code`) or ran out of time (`exit_code` None) before it answered."""

    def __init__(self, message: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log, for error messages."""
    if not path.is_file():
        return "(no log written)"
    with path.open(errors="replace") as f:
        return "\n".join(line.rstrip() for line in deque(f, maxlen=lines))


def answers(url: str, timeout_s: float = 2) -> bool:
    """Whether GET `url` answers 200 now."""
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def wait_answering(
    url: str, popen: subprocess.Popen, timeout_s: float, what: str, log: Path
) -> float:
    """Poll `url` until it answers 200; returns the seconds waited. Raises NotAnswering, quoting
    the log, when the process exits first or the time runs out."""
    start = time.monotonic()
    while not answers(url):
        if (code := popen.poll()) is not None:
            raise NotAnswering(
                f"{what} exited with status {code} before it answered {url}; "
                f"log {log} ends:\n{tail(log)}",
                code,
            )
        if time.monotonic() - start > timeout_s:
            raise NotAnswering(
                f"{what} did not answer {url} within {timeout_s:.0f} s; "
                f"log {log} ends:\n{tail(log)}",
                None,
            )
        time.sleep(0.5)
    return time.monotonic() - start


def kill_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a whole process group; one that is gone already is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def start_time(pid: int, what: str = "the process") -> float:
    """When the process started (epoch seconds): with its pid, it names one process for good."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        raise ProcessError(f"{what} (pid {pid}) ended just after it started") from None


@dataclass(frozen=True)
class Proc:
    """One started process group: what it is, where it answers, and how to recognise it later."""

    what: str
    pid: int
    pgid: int
    port: int
    url: str
    health: str  # the path that answers 200 when it is up
    log: str
    created: float  # the leader's start time (epoch s): tells our pid from a later one's

    @classmethod
    def of(cls, what: str, pid: int, port: int, health: str, log: Path) -> Proc:
        """The record of a group leader just started (its pid is its group id)."""
        url = f"http://{HOST}:{port}"
        return cls(what, pid, pid, port, url, health, str(log), start_time(pid, what))

    def answers(self) -> bool:
        return answers(self.url + self.health)


def members(proc: Proc) -> list[int]:
    """The live processes of proc's group (zombies hold nothing); none when the group leader's
    pid now belongs to another process, i.e. the record is stale."""
    try:
        leader = psutil.Process(proc.pid)
        if leader.status() != psutil.STATUS_ZOMBIE and leader.create_time() != proc.created:
            return []
    except psutil.NoSuchProcess:
        pass  # the leader is gone; members of its group may still run
    found = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == proc.pgid:
                found.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def stop(procs: Iterable[Proc], grace_s: float) -> list[str]:
    """SIGTERM every group, SIGKILL what is left after `grace_s`; return what still survives."""
    procs = list(procs)

    def signal_all(sig: signal.Signals) -> None:
        for proc in procs:
            if members(proc):
                kill_group(proc.pgid, sig)

    def wait_gone(within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while any(members(p) for p in procs):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    signal_all(signal.SIGTERM)
    if not wait_gone(grace_s):
        signal_all(signal.SIGKILL)
        wait_gone(5)
    return [f"{p.what} (group {p.pgid}: pids {left})" for p in procs if (left := members(p))]


def launch(
    what: str,
    command: list[str],
    log: Path,
    port: int,
    health: str,
    home: Home,
    env: Mapping[str, str] | None = None,
) -> tuple[Proc, subprocess.Popen[bytes]]:
    """Start `command` detached in its own process group (it outlives its starter), output to
    `log`, with `env` added to this process's environment. It runs in `home`: an environment's
    home is named by the Slipway home it shares and the environment (configs/home.py)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), "SLIPWAY_HOME": str(home.base)}
    env["SLIPWAY_ENVIRONMENT"] = home.environment or ""
    with log.open("ab") as out:
        popen = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc.of(what, popen.pid, port, health, log), popen


# ---- the record ----------------------------------------------------------------------------------


def state_path(home: Home) -> Path:
    return home.root / "run" / "stack.json"


def _from_record(raw: dict) -> Proc:
    if "start_time" in raw:  # a record written before psutil: /proc clock ticks since boot
        ticks = raw.pop("start_time")
        raw["created"] = psutil.boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    return Proc(**raw)


def read_state(home: Home) -> list[Proc]:
    path = state_path(home)
    if not path.is_file():
        return []
    return [_from_record(p) for p in json.loads(path.read_text())["processes"]]


def write_state(home: Home, procs: Iterable[Proc]) -> None:
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"processes": [asdict(p) for p in procs]}, indent=2) + "\n")
    os.replace(partial, path)  # `down` never reads a half-written record


def record(home: Home, proc: Proc) -> None:
    """Add one process to the record (before it is waited on: a crash leaves it to `down`)."""
    write_state(home, [*read_state(home), proc])


def forget(home: Home, what: str, grace_s: float = 20) -> bool:
    """Stop the recorded process group named `what` and drop it from the record; False if none
    was recorded. Raises ProcessError when something of it survives SIGKILL."""
    mine = [p for p in read_state(home) if p.what == what]
    if not mine:
        return False
    if survivors := stop(mine, grace_s):
        raise ProcessError(f"still running after SIGKILL: {'; '.join(survivors)}")
    write_state(home, [p for p in read_state(home) if p.what != what])
    return True
