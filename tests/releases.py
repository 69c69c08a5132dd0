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
from tasks.store import Store


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


def release(
    home: Home,
    name: str,
    source: Path,
    variant: str = "bf16",
    signing: Signing | None = None,
    **tags: str,
) -> str:
    """Pull into the store, sign and register `source` as the release flow does; return the
    version."""
    store = Store(home, name)
    entry, manifest = pull(DirSource(path=source), store, home)
    store.point(variant, entry.digest)
    keygen(home)
    signed = sign(entry.weights, signing or Signing(), home)
    digest = tags.pop("digest", manifest.digest)
    tags = {
        "eval_status": "passed",
        "variant": variant,
        "signature_verified": "true",
        **signed.trust.tags(),
        **tags,
    }
    return Registry(home).register(name, entry.root, digest, tags).version
