"""The one check every serving path makes: an evaluation attestation lets a backend be served only
when a trusted, not deny-listed key signed it, it is about exactly the backend's digest, and its
verdict passed (or a person's acceptance is signed into it). Each refusal says which check."""

from __future__ import annotations

import base64
import json

import pytest

from evaluation.benchmarks.attested import Signer
from serving.attestation import EVALUATION, PROVENANCE, Policy, Refused, admit, sign, statement
from tests.tasks.test_signing import make_chain

DIGEST = "sha256:" + "1" * 64
OTHER = "sha256:" + "2" * 64
SUITES = {"slipway_knowledge": "sha256:" + "a" * 64}


@pytest.fixture
def signer(tmp_path) -> Signer:
    return Signer(tmp_path)


def trusting(*signers: Signer, **more) -> Policy:
    return Policy.load([s.public_key for s in signers], **more)


def repacked(attestation: dict, edit) -> dict:
    """The attestation with its statement edited after signing (the signature left as it was)."""
    envelope = attestation["dsseEnvelope"]
    content = json.loads(base64.b64decode(envelope["payload"]))
    edit(content)
    payload = base64.b64encode(json.dumps(content).encode()).decode()
    return {**attestation, "dsseEnvelope": {**envelope, "payload": payload}}


def test_a_passing_evaluation_of_exactly_this_digest_is_admitted(signer):
    found = admit(signer.attest(DIGEST, suites=SUITES), DIGEST, trusting(signer))
    assert found.digests == (DIGEST,) and found.predicate["suites"] == SUITES
    assert found.signers == (signer.key_id,)


def test_keys_rotated_out_keep_their_attestations_valid(tmp_path, signer):
    newer = Signer(tmp_path / "new")
    policy = trusting(signer, newer)
    admit(signer.attest(DIGEST), DIGEST, policy)
    admit(newer.attest(DIGEST), DIGEST, policy)


def provenance(signer: Signer) -> dict:
    """A provenance attestation (how it was built) where an evaluation is wanted."""
    return sign(statement("m", DIGEST, PROVENANCE, {"verdict": "passed"}), signer.private_pem)


def _set_verdict(content: dict) -> None:
    content["predicate"]["verdict"] = "passed"


def _swap_suite(content: dict) -> None:
    content["predicate"]["suites"]["slipway_knowledge"] = "sha256:" + "b" * 64


def _swap_subject(content: dict) -> None:
    content["subject"][0]["digest"]["sha256"] = DIGEST.removeprefix("sha256:")


@pytest.mark.parametrize(
    ("made", "words"),
    [
        (lambda s: repacked(s.attest(DIGEST, "failed"), _set_verdict), "does not verify"),
        (lambda s: repacked(s.attest(DIGEST, suites=SUITES), _swap_suite), "does not verify"),
        (lambda s: repacked(s.attest(OTHER), _swap_subject), "does not verify"),
        (lambda s: s.attest(OTHER), f"is for {OTHER}, not for {DIGEST}"),
        (lambda s: s.attest(DIGEST, "failed"), "verdict is 'failed', not passed"),
        (lambda s: s.attest(DIGEST, "inconclusive"), "verdict is 'inconclusive'"),
        (lambda s: None, "no signed attestation"),
        (lambda s: {"verified": True}, "no signed attestation"),
        (
            lambda s: sign(
                statement("m", DIGEST, PROVENANCE, {"verdict": "passed"}), s.private_pem
            ),
            "not an evaluation",
        ),
        (
            lambda s: {"dsseEnvelope": {"signatures": "x"}, "verificationMaterial": {}},
            "not trusted here",
        ),
        (
            lambda s: {**s.attest(DIGEST), "dsseEnvelope": {"payload": "%%", "signatures": []}},
            "not base64",
        ),
        (
            lambda s: {**s.attest(DIGEST), "dsseEnvelope": {"payload": "", "signatures": 5}},
            "malformed",
        ),
    ],
    ids=[
        "verdict-edited",
        "suite-digest-swapped",
        "subject-edited",
        "another-digest",
        "failed",
        "inconclusive-unaccepted",
        "missing",
        "forged-verified",
        "provenance-only",
        "unsigned",
        "not-base64",
        "malformed",
    ],
)
def test_each_refusal_says_which_check(signer, made, words):
    with pytest.raises(Refused, match=words.replace("(", r"\(").replace(")", r"\)")):
        admit(made(signer), DIGEST, trusting(signer))


def test_an_untrusted_signer_is_refused_by_name(tmp_path, signer):
    stranger = Signer(tmp_path / "s")
    with pytest.raises(Refused, match=f"signed by key {stranger.key_id}, which is not trusted"):
        admit(stranger.attest(DIGEST), DIGEST, trusting(signer))


def test_an_accepted_inconclusive_verdict_is_admitted(signer):
    accepted = signer.attest(DIGEST, "inconclusive", acceptance={"by": "ana", "reason": "ok"})
    admit(accepted, DIGEST, trusting(signer))


def test_deny_listed_digests_and_keys_are_refused(signer):
    with pytest.raises(Refused, match=f"digest {DIGEST} is deny-listed"):
        admit(signer.attest(DIGEST), DIGEST, trusting(signer, denied_digests=[DIGEST]))
    with pytest.raises(Refused, match=f"signed by the deny-listed key {signer.key_id}"):
        admit(signer.attest(DIGEST), DIGEST, trusting(signer, denied_keys=[signer.key_id]))
    admit(signer.attest(DIGEST), DIGEST, trusting(signer, denied_digests=[OTHER]))


def test_a_certificate_chain_is_walked_to_a_trusted_authority(tmp_path):
    (tmp_path / "pki").mkdir(), (tmp_path / "other").mkdir()
    key, leaf, ca = make_chain(tmp_path / "pki")
    content = statement("m", DIGEST, EVALUATION, {"verdict": "passed"})
    signed = sign(content, key.read_bytes(), [leaf.read_bytes()])
    found = admit(signed, DIGEST, Policy.load(authority_files=[ca]))
    assert len(found.signers) == 2  # the leaf's key, then the authority's

    other_key, other_leaf, other_ca = make_chain(tmp_path / "other")
    with pytest.raises(Refused, match="does not chain to a trusted certificate authority"):
        admit(signed, DIGEST, Policy.load(authority_files=[other_ca]))
    mixed = sign(content, other_key.read_bytes(), [other_leaf.read_bytes(), ca.read_bytes()])
    with pytest.raises(Refused, match="was not issued by the next one in its chain"):
        admit(mixed, DIGEST, Policy.load(authority_files=[ca]))
    authority_id = found.signers[1]
    with pytest.raises(Refused, match="deny-listed key"):
        admit(signed, DIGEST, Policy.load(authority_files=[ca], denied_keys=[authority_id]))
