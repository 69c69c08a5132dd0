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
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.home import REPO, Home
from configs.models import Calibration, Variant
from serving.processes import kill_group
from tasks.manifest import Manifest, safetensors_header, sha256_file
from tasks.store import Entry, Store

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
    """Build `variant` of the model in `base_dir` into `out_dir`, which must not exist yet (the
    store hands out a fresh staging folder). A failed build leaves no `out_dir` behind."""
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir).resolve()
    if not (base_dir / "config.json").is_file():
        raise QuantizeError(f"{base_dir} holds no config.json: pull the model first")
    started = time.monotonic()
    calibrated = variant.recipe in CALIBRATED
    digest = calibration_digest(variant.calibration) if calibrated else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path: Path | None = None
    peak: int | None = None
    result: dict[str, Any] = {}
    try:
        if variant.recipe == "bf16" and is_bf16(base_dir):
            shutil.copytree(base_dir, out_dir)
        else:
            log_path = home.logs / f"quantize-{variant.label}-{datetime.now():%Y%m%d-%H%M%S}.log"
            with tempfile.TemporaryDirectory(prefix=".quantize-", dir=out_dir.parent) as work:
                cal = variant.calibration
                spec = {
                    "recipe": variant.recipe,
                    "model_dir": str(base_dir),
                    "out_dir": str(out_dir),
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
                if kept and extra.is_file() and not (out_dir / extra.name).exists():
                    shutil.copy2(extra, out_dir / extra.name)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    digest = digest or result.get("calibration_sha256")
    return _record(variant, base_dir, out_dir, log_path, digest, started, peak, result)


def build(
    base: Entry, variant: Variant, store: Store, home: Home, timeout_s: float = 6 * 3600
) -> tuple[VariantBuild, Entry, Manifest]:
    """`variant` of the stored `base`, in the store under its own digest. A bf16 variant of a
    bf16 base is the base itself. A build with the same inputs as an earlier one (base digest,
    variant spec, calibration data) is reused rather than rebuilt: GPTQ and AWQ are not
    bit-reproducible, so a rebuild would be a new digest, a new version of the same release."""
    started = time.monotonic()
    source = Manifest.read(base.manifest)
    if variant.recipe == "bf16" and is_bf16(base.weights):
        built = _record(variant, base.weights, base.weights, None, None, started, None, {})
        return built, base, source
    calibrated = variant.recipe in CALIBRATED
    key = build_key(
        base.digest, variant, calibration_digest(variant.calibration) if calibrated else None
    )
    if (digest := store.built(key)) and (record := store.build_of(key)):
        log.info("%s already built from this base, recipe and calibration: reused", variant.label)
        entry = store.entry(digest)
        built = VariantBuild(**record | {"out_dir": entry.weights, "log_path": None})
        return built, entry, Manifest.read(entry.manifest)
    with store.staging() as work:
        built = build_variant(base.weights, variant, work / "weights", home, timeout_s)
        entry, manifest = store.commit(work / "weights", source.source, source.revision)
    built = replace(built, out_dir=entry.weights)
    store.record_build(key, entry.digest, asdict(built) | {"out_dir": None, "log_path": None})
    return built, entry, manifest


def build_key(base_digest: str, variant: Variant, calibration: str | None) -> str:
    """What a build depends on: the base's digest, the variant's spec, the calibration data."""
    parts = [base_digest, variant.model_dump_json(), calibration or ""]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


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
# No Prefect cache: `build` reuses a build by its content (build_key) instead.
@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(
    base: Entry, variant: Variant, model: str, home: Home
) -> tuple[VariantBuild, Entry, Manifest]:
    return build(base, variant, Store(home, model), home)
