"""Quantize: build one variant directory (compressed-tensors, loadable by vLLM) from a pulled model.

`bf16` is the base itself, copied (or converted when its weights are not bf16). Every other recipe
runs llmcompressor as a subprocess in the quant environment (tasks/llmcompressor_job.py), whose
pins conflict with core's: its output streams to the logger and to a log file under home.logs,
and a failure raises QuantizeError with the reason and the tail of that log, so the caller can
record it and go on with the other variants. The directory appears only when the build succeeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.home import REPO, Home
from configs.models import Calibration, Variant
from serving.processes import kill_group
from tasks.hub import Manifest, manifest_path, safetensors_header, sha256_file

log = logging.getLogger(__name__)

CALIBRATED = {"gptq-w4a16", "awq-w4a16", "gptq-w8a8"}
TAIL_LINES = 40
# Files that travel with the weights although save_pretrained does not write them.
KEEP_PREFIXES = ("license", "licence", "notice", "readme", "use_policy")


class QuantizeError(RuntimeError):
    """A variant could not be built; the message has the reason and the tail of the job's log."""


@dataclass(frozen=True)
class VariantBuild:
    label: str
    recipe: str
    out_dir: Path
    log_path: Path | None
    calibration_sha256: str | None  # of the calibration file (of its texts, for a Hub dataset)
    wall_s: float
    peak_rss_bytes: int | None  # of the llmcompressor subprocess; None when none ran
    size_bytes: int
    compression_ratio: float  # base weight bytes / variant weight bytes
    group_size: int | None
    quantization_config: dict[str, Any] | None


# ---- measurements --------------------------------------------------------------------------------


def calibration_digest(calibration: Calibration) -> str | None:
    """sha256 of the local calibration file; None for a Hub dataset (the job digests its texts)."""
    path = calibration.path
    if path is None:
        return None
    if not path.is_file():
        raise QuantizeError(
            f'calibration file {path} does not exist: create it (one {{"text": ...}} per line) '
            "or point calibration.source at another .jsonl/.txt file"
        )
    return sha256_file(path)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def safetensors_dtypes(model_dir: Path) -> set[str]:
    """The tensor dtypes in a model's safetensors files, read from their JSON headers only."""
    return {
        t["dtype"] for f in model_dir.glob("*.safetensors") for t in safetensors_header(f).values()
    }


def is_bf16(model_dir: Path) -> bool:
    dtypes = safetensors_dtypes(model_dir)
    return "BF16" in dtypes and not dtypes & {"F16", "F32", "F64"}


# ---- the llmcompressor subprocess ----------------------------------------------------------------


def job_env(calibration: Calibration) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    if calibration.path is not None:
        # Everything is local: fail fast instead of waiting on Hub time-outs when offline.
        env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _is_progress_bar(line: str) -> bool:
    return "%|" in line or "it/s]" in line or "s/it]" in line


def run_job(
    spec: dict[str, Any], home: Home, log_path: Path, env: dict[str, str], timeout_s: float
) -> tuple[dict[str, Any], int]:
    """Run tasks.llmcompressor_job on `spec`; return its result JSON and its peak RSS in bytes."""
    python = home.python("quant")
    if not python.exists():
        raise QuantizeError(f"the quant environment is missing ({python}): run `make setup`")
    spec_path, result_path = Path(spec["result"]).with_name("spec.json"), Path(spec["result"])
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    timed_out = threading.Event()
    # text mode turns tqdm's carriage returns into line ends, so progress arrives line by line.
    proc = subprocess.Popen(
        [str(python), "-m", "tasks.llmcompressor_job", "--spec", str(spec_path)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def kill() -> None:
        timed_out.set()
        kill_group(proc.pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout_s, kill)
    watchdog.start()
    try:
        with log_path.open("w") as logfile:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                if not line:
                    continue
                logfile.write(line + "\n")
                tail.append(line)
                log.log(logging.DEBUG if _is_progress_bar(line) else logging.INFO, "%s", line)
        # wait4 gives this child's own rusage: its peak RSS, not the largest of all children.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        watchdog.cancel()
        if proc.returncode is None:
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if proc.returncode != 0 or "error" in result:
        if timed_out.is_set():
            reason = f"timed out after {timeout_s:.0f} s"
        elif "error" in result:
            reason = result["error"]
        elif proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            reason = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        else:
            reason = f"exited with status {proc.returncode}"
        raise QuantizeError(
            f"{spec['recipe']} failed: {reason}\n  log: {log_path}\n  last lines:\n"
            + "\n".join(f"    {line}" for line in tail)
        )
    return result, usage.ru_maxrss * 1024  # Linux reports KiB


# ---- build ---------------------------------------------------------------------------------------


def build_variant(
    base_dir: Path, variant: Variant, out_dir: Path, home: Home, timeout_s: float = 6 * 3600
) -> VariantBuild:
    """Build `variant` of the model in `base_dir` into `out_dir` (replaced only on success).

    `out_dir` may be `base_dir` for bf16: a bf16 base is then used as it is.
    """
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir).resolve()
    if not (base_dir / "config.json").is_file():
        raise QuantizeError(f"{base_dir} holds no config.json: pull the model first")
    started = time.monotonic()
    if variant.recipe == "bf16" and is_bf16(base_dir) and base_dir == out_dir:
        return _record(variant, base_dir, out_dir, None, None, started, None, {})

    calibrated = variant.recipe in CALIBRATED
    digest = calibration_digest(variant.calibration) if calibrated else None
    key = build_key(base_dir, variant, digest)
    if key and (done := reuse(out_dir, key)):
        log.info("%s already built from this base, recipe and calibration: reused", variant.label)
        return done
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.parent.glob(f".{out_dir.name}-*"), *out_dir.parent.glob(".quantize-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed (SIGKILL, OOM)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    log_path: Path | None = None
    peak: int | None = None
    result: dict[str, Any] = {}
    try:
        if variant.recipe == "bf16" and is_bf16(base_dir):
            shutil.copytree(base_dir, staging, dirs_exist_ok=True)
        else:
            log_path = home.logs / f"quantize-{variant.label}-{datetime.now():%Y%m%d-%H%M%S}.log"
            with tempfile.TemporaryDirectory(prefix=".quantize-", dir=out_dir.parent) as work:
                cal = variant.calibration
                spec = {
                    "recipe": variant.recipe,
                    "model_dir": str(base_dir),
                    "out_dir": str(staging),
                    "group_size": variant.group_size,
                    "smoothing_strength": variant.smoothing_strength,
                    "calibration": {
                        "source": str(cal.path) if cal.path else cal.source,
                        "samples": cal.samples,
                        "seq_len": cal.seq_len,
                    }
                    if calibrated
                    else None,
                    "result": str(Path(work) / "result.json"),
                }
                log.info("building %s (%s); log: %s", variant.label, variant.recipe, log_path)
                result, peak = run_job(spec, home, log_path, job_env(cal), timeout_s)
            for extra in base_dir.iterdir():
                kept = extra.name.lower().startswith(KEEP_PREFIXES)
                if kept and extra.is_file() and not (staging / extra.name).exists():
                    shutil.copy2(extra, staging / extra.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    digest = digest or result.get("calibration_sha256")
    build = _record(variant, base_dir, out_dir, log_path, digest, started, peak, result)
    if key:
        record = {"key": key, "build": asdict(build) | {"out_dir": None, "log_path": None}}
        build_record(out_dir).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return build


# ---- reuse ---------------------------------------------------------------------------------------


def build_record(out_dir: Path) -> Path:
    """Beside the variant's weights (like its manifest), so it is never signed or served."""
    return out_dir.parent / "build.json"


def build_key(base_dir: Path, variant: Variant, calibration: str | None) -> str | None:
    """What a build depends on: the base's digest, the variant's spec, the calibration data. GPTQ
    and AWQ are not bit-reproducible, so rebuilding would make a new digest (a new version) of
    the same release; None (never reuse) when the base has no manifest to vouch for it."""
    manifest = manifest_path(base_dir)
    if not manifest.is_file():
        return None
    parts = [Manifest.read(manifest).digest, variant.model_dump_json(), calibration or ""]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def reuse(out_dir: Path, key: str) -> VariantBuild | None:
    """The recorded build of `out_dir` if it was made with this key. Its files are not trusted
    here: the release hashes them again, so a changed directory is a new digest, never reused."""
    path = build_record(out_dir)
    if not (out_dir / "config.json").is_file() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("key") != key:
            return None
        return VariantBuild(**record["build"] | {"out_dir": out_dir, "log_path": None})
    except (ValueError, TypeError, KeyError):
        return None


def _record(
    variant: Variant,
    base_dir: Path,
    out_dir: Path,
    log_path: Path | None,
    digest: str | None,
    started: float,
    peak: int | None,
    result: dict[str, Any],
) -> VariantBuild:
    build = VariantBuild(
        label=variant.label,
        recipe=variant.recipe,
        out_dir=out_dir,
        log_path=log_path,
        calibration_sha256=digest,
        wall_s=round(time.monotonic() - started, 2),
        peak_rss_bytes=peak,
        size_bytes=dir_size(out_dir),
        compression_ratio=round(weight_bytes(base_dir) / max(weight_bytes(out_dir), 1), 3),
        group_size=result.get("group_size"),
        quantization_config=result.get("quantization_config"),
    )
    log.info(
        "built %s in %.1f s: %.1f MB, %.2fx smaller than the base",
        build.label,
        build.wall_s,
        build.size_bytes / 1e6,
        build.compression_ratio,
    )
    return build


# ---- Prefect -------------------------------------------------------------------------------------


# No retries: a recipe that fails once fails again; the flow records the error and goes on.
# No Prefect cache: its key would be the base's path, not its content; build_variant reuses a
# build by content (build_key) instead.
@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(base_dir: Path, variant: Variant, out_dir: Path, home: Home) -> VariantBuild:
    return build_variant(base_dir, variant, out_dir, home)
