"""A version is served only with a signed evaluation attestation of exactly its digest that this
home's trust admits. Each way of getting around it is refused at each enforcement point: `make up`
(the champion), the rollout (its candidate) and the revert (`previous`), with a message saying
which check failed. A deny-listed key is refused everywhere, and `covered_by` names what it
signed."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from configs.models import Signing
from serving.attestation import EVALUATION, Refused
from tasks.attest import ATTESTATIONS, TAG, attest, attest_recorded, covered_by, deny, write
from tasks.registry import Registry
from tasks.rollout.plan import RolloutRefused, preconditions
from tasks.rollout.revert import RevertRefused, revert_plan
from tasks.servable import NotServable, accept, check_servable, version_of
from tasks.signing import default_keys, key_fingerprint
from tests.releases import gateway_serving, release, stand_in_model
from tests.serving.conftest import MODEL

TAG_EVAL = TAG[EVALUATION]


def resigned(registry: Registry, version: str, edit: Callable[[dict], None]) -> None:
    """The version's attestation edited after signing, stored and tagged as if it were genuine:
    what someone with write access to the registry and the store could do."""
    chosen = version_of(registry, MODEL, version)
    signed = chosen.attestation
    envelope = signed["dsseEnvelope"]
    content = json.loads(base64.b64decode(envelope["payload"]))
    edit(content)
    payload = base64.b64encode(json.dumps(content).encode()).decode()
    forged = {**signed, "dsseEnvelope": {**envelope, "payload": payload}}
    registry.tag(MODEL, version, {TAG_EVAL: write(chosen.entry, forged)})


def borrowed(registry: Registry, version: str, other: str) -> None:
    """Another version's genuine attestation put in this version's place."""
    theirs, mine = version_of(registry, MODEL, other), version_of(registry, MODEL, version)
    tag = theirs.tags[TAG_EVAL]
    name = f"{tag.replace(':', '-')}.json"
    shutil.copyfile(theirs.entry.root / ATTESTATIONS / name, mine.entry.root / ATTESTATIONS / name)
    registry.tag(MODEL, version, {TAG_EVAL: tag})


def failed(registry: Registry, version: str) -> None:
    """A genuine, signed evaluation whose verdict failed (the tags still say passed)."""
    chosen = version_of(registry, MODEL, version)
    verdict = {"verdict": "failed"}
    registry.tag(
        MODEL, version, attest(chosen.entry, MODEL, EVALUATION, verdict, Signing(), registry.home)
    )


def _verdict(content: dict) -> None:
    content["predicate"]["verdict"] = "passed"


def _suites(content: dict) -> None:
    content["predicate"]["suites"] = {"slipway_knowledge": "sha256:" + "b" * 64}


@pytest.fixture
def versions(home, tmp_path) -> tuple[Registry, str, str]:
    registry = Registry(home)
    one = release(home, MODEL, stand_in_model(tmp_path / "a", b"one"))
    two = release(home, MODEL, stand_in_model(tmp_path / "b", b"two"), "gptq-w8a8")
    return registry, one, two


POINTS = ["make up", "rollout", "revert"]


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as opened:
        yield opened


def enforce(
    point: str, stack: ExitStack, registry: Registry, one: str, two: str
) -> tuple[str, Callable[[], object]]:
    """The version `point` checks and the call that checks it (each refusal raises)."""
    registry.promote(MODEL, one)
    if point == "make up":
        return one, lambda: check_servable(version_of(registry, MODEL, one))
    if point == "rollout":
        admin = gateway_serving(stack, registry.home, one)
        return two, lambda: preconditions(registry, admin, MODEL, two)
    registry.promote(MODEL, two)  # previous = one: the revert reinstates it
    admin = gateway_serving(stack, registry.home, two)
    return one, lambda: revert_plan(registry, admin, MODEL)


@pytest.mark.parametrize("point", POINTS)
def test_each_way_around_the_attestation_is_refused_at_each_point(versions, home, point, stack):
    registry, one, two = versions
    checked, check = enforce(point, stack, registry, one, two)
    other = two if checked == one else one
    check()  # genuine: admitted
    genuine = registry.tags(MODEL, checked)[TAG_EVAL]
    digest = registry.tags(MODEL, checked)["digest"]
    tamperings = {
        "verdict edited": (lambda: resigned(registry, checked, _verdict), "does not verify"),
        "suite digest swapped": (lambda: resigned(registry, checked, _suites), "does not verify"),
        "another version's": (lambda: borrowed(registry, checked, other), f"not for {digest}"),
        "failed verdict": (lambda: failed(registry, checked), "verdict is 'failed'"),
        "unsigned": (
            lambda: registry.tag(MODEL, checked, {TAG_EVAL: ""}),
            "no signed attestation",
        ),
        "deny-listed digest": (
            lambda: deny(home, "digest", digest, "test"),
            f"digest {digest} is deny-listed",
        ),
    }
    refused = (NotServable, RolloutRefused, RevertRefused)
    for name, (tamper, words) in tamperings.items():
        tamper()
        with pytest.raises(refused, match="evaluation attestation is refused") as e:
            check()
        assert words in str(e.value), (name, str(e.value))
        registry.tag(MODEL, checked, {TAG_EVAL: genuine})
        (home.keys / "denied.json").unlink(missing_ok=True)
    check()  # put back: admitted again


def test_a_deny_listed_key_makes_what_it_signed_unservable(versions, home, tmp_path):
    registry, one, two = versions
    key = key_fingerprint(default_keys(home)[1])
    assert covered_by(registry, key) == [(MODEL, one), (MODEL, two)]
    deny(home, "key", key, "the laptop it lived on was stolen")
    with pytest.raises(NotServable, match=f"signed by the deny-listed key {key}"):
        check_servable(version_of(registry, MODEL, one))


def test_a_person_s_acceptance_of_an_inconclusive_verdict_is_signed_into_it(home, tmp_path):
    registry = Registry(home)
    version = release(
        home, MODEL, stand_in_model(tmp_path / "a", b"maybe"), eval_status="inconclusive"
    )
    with pytest.raises(NotServable, match="inconclusive"):
        check_servable(version_of(registry, MODEL, version))
    accept(registry, MODEL, version, "ana", "margin too strict for this task")
    chosen = version_of(registry, MODEL, version)
    check_servable(chosen)
    statement = json.loads(base64.b64decode(chosen.attestation["dsseEnvelope"]["payload"]))
    assert statement["predicate"]["acceptance"]["by"] == "ana"


def test_a_version_registered_before_attestations_is_attested_from_its_recorded_verdict(
    versions, home
):
    registry, one, _ = versions
    registry.tag(MODEL, one, {TAG_EVAL: ""})  # as a release before attestations left it
    registry.promote(MODEL, one)
    with pytest.raises(NotServable, match=f"`slipway attest {MODEL} {one}`"):
        check_servable(version_of(registry, MODEL, one))
    made = attest_recorded(registry, MODEL, one)
    chosen = version_of(registry, MODEL, one)
    check_servable(chosen)
    statement = json.loads(base64.b64decode(chosen.attestation["dsseEnvelope"]["payload"]))
    assert statement["predicate"]["verdict"] == "passed" and "recorded" in statement["predicate"]
    with pytest.raises(Refused, match="has an evaluation attestation already"):
        attest_recorded(registry, MODEL, one)
    assert registry.tags(MODEL, one)[TAG_EVAL] == made[TAG_EVAL]
