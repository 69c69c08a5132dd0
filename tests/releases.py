"""Registered versions for tests: pulled, signed and registered the way the release flow does."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from configs.home import Home
from configs.models import DirSource, Signing
from tasks.hub import pull
from tasks.registry import Registry
from tasks.signing import keygen, sign


def stand_in_model(root: Path, content: bytes) -> Path:
    """A small model directory whose safetensors file is valid and holds `content` (one uint8
    tensor): distinct contents give distinct digests."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [len(content)], "data_offsets": [0, len(content)]}}
    )
    (root / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header.encode() + content
    )
    return root


def release(home: Home, name: str, source: Path, variant: str = "bf16", **tags: str) -> str:
    """Pull, sign and register `source` as the release flow does; return the version."""
    weights = home.models / name / variant / "weights"
    manifest = pull(DirSource(path=source), weights, home)
    keygen(home)
    sign(weights, Signing(), home)
    digest = tags.pop("digest", manifest.digest)
    tags = {"eval_status": "passed", "variant": variant, "signature_verified": "true", **tags}
    return Registry(home).register(name, weights.parent, digest, tags).version
