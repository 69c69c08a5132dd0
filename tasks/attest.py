"""Attestations of a release: what was measured about a digest and how it was built, signed with
the version's own signing key and kept beside its weights.

    models/<name>/sha256-<hex>/attestations/sha256-<hex>.json   one file per attestation, named
                                                                by its own digest (write-once)

The version's tags name the ones in force (`attestation_evaluation`, `attestation_provenance`);
the release logs the entry with them, so MLflow's artifact copy carries them to other nodes.
Serving reads the evaluation attestation the tag names and checks it with `serving.attestation`
against the home's keyring and deny-list, as the gateway does with its own copy of the trust.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.evaluation import SUITES_DIR
from configs.gateway import TrustSpec
from configs.home import Home
from configs.models import ModelConfig, Signing, Variant
from evaluation.quality.gates import QualityResult, Verdict
from serving.attestation import (
    EVALUATION,
    PROVENANCE,
    Policy,
    Refused,
    attestation_digest,
    sign,
    statement,
    verify,
)
from serving.gateway.trust import DENIED, Trust
from serving.vllm import hardware_class
from tasks.manifest import Manifest
from tasks.quantize import VariantBuild
from tasks.registry import Registry
from tasks.signing import SignatureError, default_keys
from tasks.store import Entry, Store, write_json

ATTESTATIONS = "attestations"
TAG = {EVALUATION: "attestation_evaluation", PROVENANCE: "attestation_provenance"}


def policy(home: Home) -> Policy:
    """The trust of this home: its keyring and deny-list (the gateway's, less its extras)."""
    return Trust(TrustSpec(), home.keys).policy


# ---- predicates ----------------------------------------------------------------------------------


def suite_digests(suites: list[str], suites_dir: Path = SUITES_DIR) -> dict[str, str]:
    """sha256 of each shipped suite: its YAML and every data file the YAML names, in order."""
    data = sorted((suites_dir / "data").glob("*")) if (suites_dir / "data").is_dir() else []
    digests = {}
    for name in suites:
        path = suites_dir / f"{name}.yaml"
        if not path.is_file():
            continue  # a Hub task: named in `tasks`, its data is lm-eval's to pin
        text = path.read_bytes()
        h = hashlib.sha256(text)
        for extra in data:
            if extra.stem.encode() in text or extra.name.encode() in text:
                h.update(extra.read_bytes())
        digests[name] = "sha256:" + h.hexdigest()
    return digests


def _installed(home: Home, env: str, package: str) -> str | None:
    """A package's version in one of the home's environments, read from its metadata files."""
    prefix = home.python(env).parent.parent
    found = sorted(prefix.glob(f"lib/python*/site-packages/{package}-*.dist-info"))
    return found[-1].name.removesuffix(".dist-info").split("-", 1)[1] if found else None


def evaluation_predicate(
    config: ModelConfig,
    variant: Variant,
    quality: QualityResult,
    verdict: Verdict,
    home: Home,
) -> dict[str, Any]:
    """What the trial measured and what it decided, with everything needed to judge the claim:
    the suites by digest, the harness and engine versions, the hardware, each gate's interval."""
    return {
        "model": config.name,
        "variant": variant.label,
        "recipe": variant.recipe,
        "verdict": verdict.status,
        "reasons": verdict.reasons,
        "gates": [g.model_dump(mode="json") for g in verdict.gates],
        "alpha": config.gates.alpha,
        "suites": suite_digests(config.evaluation.suites),
        "extra_tasks": config.evaluation.extra_tasks,
        "samples": {task: score.n for task, score in quality.tasks.items()},
        "limit": quality.limit,
        "harness": {"lm_eval": metadata.version("lm_eval")},
        "engine": {"vllm": _installed(home, "serve", "vllm")},
        "hardware": hardware_class(),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def provenance_predicate(
    variant: Variant, base: Entry, source: str, revision: str, build: Mapping[str, Any], home: Home
) -> dict[str, Any]:
    """How a variant was built from its base: the base by digest and origin, the recipe, the
    calibration data by digest, and the quantizer's version."""
    return {
        "base": {"digest": base.digest, "source": source, "revision": revision},
        "recipe": variant.model_dump(mode="json"),
        "calibration_sha256": build.get("calibration_sha256"),
        "quantization_config": build.get("quantization_config"),
        "builder": {"llmcompressor": _installed(home, "quant", "llmcompressor")},
        # None: llmcompressor shuffles the calibration samples with torch's unseeded RandomSampler
        # (shuffle_calibration_samples defaults to true), so there is no seed to record.
        "seed": None,
    }


# ---- signing and storing -------------------------------------------------------------------------


def _signing_material(config: Signing, home: Home) -> tuple[bytes, list[bytes]]:
    match config.method:
        case "key":
            private = config.private_key or default_keys(home)[0]
            if not private.is_file():
                raise SignatureError(f"no signing key at {private}: run `make setup`")
            return private.read_bytes(), []
        case "certificate":
            chain = [config.signing_certificate, *config.certificate_chain]
            return config.private_key.read_bytes(), [p.read_bytes() for p in chain]
        case "sigstore":
            raise SignatureError(
                "keyless Sigstore cannot sign an attestation offline here: sign the release with "
                "`key` or `certificate`"
            )


def write(entry: Entry, attestation: Mapping[str, Any]) -> str:
    """Keep `attestation` in the entry under its own digest (written once); its digest."""
    digest = attestation_digest(attestation)
    path = entry.root / ATTESTATIONS / f"{digest.replace(':', '-')}.json"
    if not path.is_file():
        write_json(path, dict(attestation))
    return digest


def attest(
    entry: Entry,
    name: str,
    predicate_type: str,
    predicate: Mapping[str, Any],
    signing: Signing,
    home: Home,
) -> dict[str, str]:
    """Sign a statement about the entry's digest and keep it there; the tag that names it."""
    private, chain = _signing_material(signing, home)
    signed = sign(statement(name, entry.digest, predicate_type, predicate), private, chain)
    return {TAG[predicate_type]: write(entry, signed)}


def read(entry: Entry, tags: Mapping[str, str], predicate_type: str = EVALUATION) -> Any:
    """The attestation the version's tags name, from its store entry; None when there is none."""
    digest = tags.get(TAG[predicate_type])
    path = entry.root / ATTESTATIONS / f"{(digest or '').replace(':', '-')}.json"
    if not digest or not path.is_file():
        return None
    data = json.loads(path.read_text())
    if attestation_digest(data) != digest:
        raise Refused(f"{path} is not the attestation {digest}: it changed after it was written")
    return data


def accepted(
    entry: Entry,
    tags: Mapping[str, str],
    name: str,
    acceptance: Mapping[str, str],
    home: Home,
    signing: Signing,
) -> dict[str, str]:
    """The evaluation attestation again, with a person's acceptance of its inconclusive verdict
    added to the predicate and signed; the tag that names it."""
    current = verify(read(entry, tags), policy(home))
    predicate = dict(current.predicate) | {"acceptance": dict(acceptance)}
    return attest(entry, name, EVALUATION, predicate, signing, home)


@task(name="attest", cache_policy=NO_CACHE)
def attest_release_task(
    entry: Entry,
    config: ModelConfig,
    variant: Variant,
    quality: QualityResult,
    verdict: Verdict,
    base: Entry,
    build: VariantBuild,
    home: Home,
) -> dict[str, str]:
    """The release's attestations of one variant, signed and kept; the tags that name them: its
    evaluation always, its provenance when it was built from a base (not the base itself)."""
    predicate = evaluation_predicate(config, variant, quality, verdict, home)
    tags = attest(entry, config.name, EVALUATION, predicate, config.signing, home)
    if entry.digest != base.digest:
        source = Manifest.read(base.manifest)
        built = provenance_predicate(
            variant, base, source.source, source.revision, asdict(build), home
        )
        tags |= attest(entry, config.name, PROVENANCE, built, config.signing, home)
    return tags


# ---- deny-list -----------------------------------------------------------------------------------


def deny(home: Home, kind: str, value: str, reason: str) -> dict[str, Any]:
    """Add a digest or a key id to the home's deny-list (the gateway re-reads it while it runs);
    the list as it is now, each entry with why and when."""
    if kind not in ("digest", "key") or not value.startswith("sha256:") or len(value) != 71:
        raise ValueError(f"deny a `digest` or a `key` as sha256:<64 hex>, not {kind} {value!r}")
    if not reason.strip():
        raise ValueError("say why (--reason): the deny-list keeps it")
    path = home.keys / DENIED
    data = json.loads(path.read_text()) if path.is_file() else {"digests": [], "keys": []}
    listed = data.setdefault(f"{kind}s", [])
    if value not in listed:
        listed.append(value)
        data.setdefault("why", []).append(
            {"kind": kind, "value": value, "reason": reason, "at": datetime.now(UTC).isoformat()}
        )
        write_json(path, data)
    return data


def signers(attestation: Any) -> set[str]:
    """Who an attestation says signed it (unverified: for listing, never for trusting)."""
    if not isinstance(attestation, Mapping):
        return set()
    material = attestation.get("verificationMaterial") or {}
    found = {s.get("keyid") for s in attestation.get("dsseEnvelope", {}).get("signatures", [])}
    return {k for k in found | {material.get("publicKey")} if k}


def covered_by(registry: Registry, key: str) -> list[tuple[str, str]]:
    """Every registered version whose weights or evaluation `key` signed: what deny-listing it
    makes unservable. Versions whose files are not on this node are judged by their tags."""
    found = []
    for model in registry.model_names():
        for version in registry.versions(model):
            tags = registry.tags(model, version)
            entry = (
                Store(registry.home, model).entry(tags["digest"]) if tags.get("digest") else None
            )
            attested = read(entry, tags) if entry is not None and entry.exists() else None
            if tags.get("signing_key_fingerprint") == key or key in signers(attested):
                found.append((model, version))
    return found


def attest_recorded(registry: Registry, name: str, version: str) -> dict[str, str]:
    """An evaluation attestation for a version registered before releases attested: its
    recorded verdict (the registry's `eval_*` tags), signed now with this home's key, and marked
    as such. A version that has one already is refused: attestations are not rewritten."""
    tags = registry.tags(name, version)
    if tags.get(TAG[EVALUATION]):
        raise Refused(f"{name} v{version} has an evaluation attestation already")
    if not (status := tags.get("eval_status")) or not (digest := tags.get("digest")):
        raise Refused(f"{name} v{version} records no eval_status and digest to attest")
    entry = Store(registry.home, name).entry(digest)
    if not entry.exists():
        raise Refused(f"{name} v{version} is not in this node's store: `slipway store fetch` it")
    predicate = {
        "verdict": status,
        "reasons": tags.get("eval_reasons", ""),
        "variant": tags.get("variant"),
        "recorded": "from the registry's tags: registered before releases attested",
        "attested_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if tags.get("eval_accepted_by"):
        predicate["acceptance"] = {
            "by": tags["eval_accepted_by"],
            "reason": tags.get("eval_accepted_reason", ""),
        }
    made = attest(entry, name, EVALUATION, predicate, Signing(), registry.home)
    registry.tag(name, version, made)
    return made
