"""Registered versions for tests: pulled, signed, attested and registered the way the release flow
does (the evaluation attestation states the `eval_status` asked for)."""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from configs.home import Home
from configs.models import DirSource, Signing
from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from serving.attestation import EVALUATION
from serving.gateway.app import build_app
from tasks.attest import attest
from tasks.gateway_admin import GatewayAdmin
from tasks.hub import pull
from tasks.registry import Registry
from tasks.servable import version_of
from tasks.signing import keygen, sign
from tasks.store import Store
from tests.serving.conftest import MODEL, Secrets


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
        **manifest.tags(),
        "eval_status": "passed",
        "variant": variant,
        "signature_verified": "true",
        **signed.trust.tags(),
        **tags,
    }
    verdict = {"verdict": tags["eval_status"], "variant": variant}
    tags |= attest(entry, name, EVALUATION, verdict, signing or Signing(), home)
    return Registry(home).register(name, entry.root, digest, tags).version


def attestation_of(home: Home, name: str, version: str) -> Any:
    """The version's evaluation attestation, as the rollout carries it into a route."""
    return version_of(Registry(home), name, version).attestation


def stable_backend(home: Home, name: str, version: str, url: str) -> dict[str, Any]:
    """A route's backend serving the registered `version` at `url`, as stable, with all traffic."""
    return {
        "version": version,
        "url": url,
        "served_model": f"{name}-v{version}",
        "digest": Registry(home).tags(name, version)["digest"],
        "attestation": attestation_of(home, name, version),
        "weight": 100,
        "role": "stable",
    }


def gateway_serving(stack: ExitStack, home: Home, version: str) -> GatewayAdmin:
    """A real gateway whose route serves `version` alone, as stable."""
    keys = Secrets()
    upstream = stack.enter_context(serve(MockUpstream()))
    backend = stable_backend(home, MODEL, version, upstream)
    url = stack.enter_context(serve(build_app(keys.config([backend]), home)))
    return GatewayAdmin(url, keys.admin)
