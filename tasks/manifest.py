"""What identifies a model directory: sha256 per file, one digest for the whole model, and the
manifest that records them with the model's source and resolved revision. The digest is the
thread through the store, the registry, the signature and serving."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from evaluation.quality.chat_template import digest as template_digest
from evaluation.quality.chat_template import extract

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    source: str
    revision: str
    digest: str
    files: dict[str, str]
    license: str | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    chat_template_sha256: str | None = None  # None: no chat template (or recorded before it was)

    def tags(self) -> dict[str, str]:
        """What the registry records of where the model came from, and its chat template."""
        return {
            "source": self.source,
            "revision": self.revision,
            "license": self.license or "unknown",
        } | ({"chat_template_sha256": t} if (t := self.chat_template_sha256) else {})

    @classmethod
    def of(
        cls, model_dir: Path, source: str, revision: str, files: dict[str, str] | None = None
    ) -> Manifest:
        """The manifest of `model_dir` (hashed here unless `files` already holds its hashes)."""
        files = files if files is not None else hash_dir(model_dir)
        template = extract(model_dir)
        return cls(
            source,
            revision,
            model_digest(files),
            files,
            find_license(model_dir),
            chat_template_sha256=template_digest(template) if template is not None else None,
        )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls(**json.loads(path.read_text()))


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
