"""May this registered version be served? The one check that `make up`, the rollout and the
regression make before any traffic reaches a version.

A version is servable only if its evaluation passed (or was inconclusive and a person accepted it
by name, `accept`: never automatically), its store entry (the directory named by its
registered digest) holds its weights, manifest and signature, the signature verifies with exactly
the trust the version records, both the manifest's digest and the digest of the files
themselves equal the digest the registry holds for it, and its signed evaluation attestation
(tasks/attest.py) is about exactly that digest, passed (or carries the signed acceptance), and is
signed by a key of this home's keyring that is not deny-listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from configs.home import Home
from configs.models import Signing
from serving.attestation import EVALUATION, Refused, admit
from tasks.attest import TAG, accepted, policy, read
from tasks.manifest import Manifest, hash_dir, model_digest
from tasks.registry import Registry
from tasks.signing import SignatureError, Trust, verify
from tasks.store import Entry, Store, StoreError

CHAMPION = "champion"


class NotServable(RuntimeError):
    """A version must not be served; the message says why and what to do next."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model, with the tags its checks need."""

    model: str
    version: str
    tags: dict[str, str]
    home: Home

    @property
    def served_name(self) -> str:
        return f"{self.model}-v{self.version}"

    @property
    def record(self) -> str:
        """Its vLLM's name in the stack's record: `up`, the rollout and the regression share it."""
        return f"vllm {self.served_name}"

    @property
    def entry(self) -> Entry:
        """Its directory in the model store, named by its registered digest."""
        if not (digest := self.tags.get("digest")):
            raise NotServable(f"{self} has no `digest` tag: its files cannot be found")
        try:
            return Store(self.home, self.model).entry(digest)
        except StoreError as e:
            raise NotServable(f"{self}: {e}") from None

    @property
    def weights(self) -> Path:
        return self.entry.weights

    @property
    def attestation(self) -> object:
        """Its signed evaluation attestation (the one its tags name), as routes carry it."""
        return read(self.entry, self.tags)

    def __str__(self) -> str:
        return f"{self.model} v{self.version} ({self.tags.get('variant', 'no variant tag')})"


def accept(registry: Registry, model: str, version: str, by: str, reason: str) -> dict[str, str]:
    """A person's decision to serve a version whose evaluation was inconclusive (it could show
    neither that the variant keeps its base's quality nor that it loses it), recorded on the
    version: who, why and when. Passed versions need none; failed ones cannot be accepted."""
    status = registry.tags(model, version).get("eval_status")
    if status != "inconclusive":
        raise NotServable(
            f"{model} v{version} has eval_status={status}: only an inconclusive evaluation can be "
            "accepted by hand"
        )
    if not by.strip() or not reason.strip():
        raise NotServable("accepting needs the person's name (--by) and a reason (--reason)")
    tags = {
        "eval_accepted_by": by,
        "eval_accepted_reason": reason,
        "eval_accepted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    chosen = version_of(registry, model, version)
    acceptance = {k.removeprefix("eval_accepted_"): v for k, v in tags.items()}
    # Signed with this home's key: the acceptance is this operator's word, not the release's.
    try:
        tags |= accepted(chosen.entry, chosen.tags, model, acceptance, registry.home, Signing())
    except Refused as e:
        raise NotServable(f"{model} v{version}: its evaluation attestation is refused: {e}") from e
    registry.tag(model, version, tags)
    return tags


def version_of(registry: Registry, model: str, version: str) -> ModelVersion:
    return ModelVersion(model, version, registry.tags(model, version), registry.home)


def champions(registry: Registry) -> list[ModelVersion]:
    """The version each registered model's `champion` alias names, by model name."""
    found = []
    for model in registry.model_names():
        if (version := registry.alias(model, CHAMPION)) is not None:
            found.append(version_of(registry, model, version))
    return found


def check_servable(version: ModelVersion, role: str = CHAMPION) -> None:
    """Raise NotServable unless the version may be served: evaluation passed, weights present and
    signed, and both the manifest's and the weights' own digest equal the registry's digest tag.
    `role` names it in the message (the rollout checks its candidate the same way)."""

    def refuse(reason: str) -> NotServable:
        return NotServable(f"refusing to serve the {role} {version}: {reason}")

    tags = version.tags
    status = tags.get("eval_status")
    if status != "passed" and not (status == "inconclusive" and tags.get("eval_accepted_by")):
        reasons = tags.get("eval_reasons", "no reasons recorded")
        hint = (
            "point `champion` at a version whose evaluation passed (the rollout flow does)"
            if role == CHAMPION
            else "only a version whose evaluation passed may be served"
        )
        if status == "inconclusive":
            hint += (
                f", or one a person accepted: `slipway accept {version.model} "
                f"{version.version} --by NAME --reason TEXT`"
            )
        raise refuse(f"its evaluation did not pass (eval_status={status}: {reasons}); {hint}")
    if not (digest := tags.get("digest")):
        raise refuse("the version has no `digest` tag to check its weights against")
    entry = version.entry
    if not entry.exists():
        raise refuse(
            f"its weights are not in the model store ({entry.root}): fetch them from MLflow with "
            f"`slipway store fetch {version.model} {version.version}`, or run the release on "
            "this machine"
        )
    weights, manifest = entry.weights, entry.manifest
    recorded = Manifest.read(manifest).digest
    if recorded != digest:
        raise refuse(
            f"{manifest} records digest {recorded} but the registry's digest is {digest}: "
            "the files on disk are not the registered model; re-run the release"
        )
    try:
        verify(weights, Trust.from_tags(tags), version.home)
    except SignatureError as e:
        raise refuse(f"its signature does not verify: {e}") from e
    if (actual := model_digest(hash_dir(weights))) != digest:
        raise refuse(
            f"the weights at {weights} hash to {actual}, not the registered {digest}: "
            "they changed after the release; re-run the release"
        )
    try:
        admit(version.attestation, digest, policy(version.home))
    except Refused as e:
        hint = (
            f"; a version registered before releases attested gets one from its recorded "
            f"verdict with `slipway attest {version.model} {version.version}`"
            if not tags.get(TAG[EVALUATION])
            else ""
        )
        raise refuse(f"its evaluation attestation is refused: {e}{hint}") from None
