"""A throwaway signer for gateways that serve made-up backends (benchmarks, tests): its own P-256
key, the `trust` section that makes a gateway accept it, and passing evaluation attestations for
any digest. The gateway checks them exactly as it checks a release's; nothing is switched off."""

from __future__ import annotations

import json
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from serving.attestation import EVALUATION, key_id, sign, statement


class Signer:
    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or Path(tempfile.mkdtemp(prefix="slipway-signer-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self._signed: dict[str, dict[str, Any]] = {}

    @cached_property
    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @cached_property
    def public_key(self) -> Path:
        path = self.folder / "attestation-signer.pub"
        path.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    @property
    def key_id(self) -> str:
        return key_id(self.key.public_key())

    def trust(self, **more: Any) -> dict[str, Any]:
        """A gateway config's `trust` section accepting this signer."""
        return {"keys": [str(self.public_key)], **more}

    def attest(self, digest: str, verdict: str = "passed", **predicate: Any) -> dict[str, Any]:
        """A signed evaluation attestation of `digest` with `verdict`; the same one each time it
        is asked again (ECDSA signatures are randomised), so routes built twice compare equal."""
        content = statement("made-up", digest, EVALUATION, {"verdict": verdict, **predicate})
        key = json.dumps(content, sort_keys=True)
        if key not in self._signed:
            self._signed[key] = sign(content, self.private_pem)
        return self._signed[key]
