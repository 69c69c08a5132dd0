"""Signed statements about exactly one model digest, and the public trust that checks them.

A statement is an in-toto Statement v1 (https://in-toto.io/Statement/v1): its subject is the
model by digest, its predicate says something about those bytes (how they were evaluated, how
they were built). It is signed as a DSSE envelope (the signature covers the payload type and the
payload's bytes, github.com/secure-systems-lab/dsse) with ECDSA P-256 / SHA-256, by the key that
signs the weights or by a certificate a trusted authority issued (the attestation then carries
the certificate path). An attestation is `{"dsseEnvelope": ..., "verificationMaterial": ...}`.

Checking needs public material only. A `Policy` holds the keys and certificate authorities to
trust and the deny-list (digests, and keys by the sha256 of their DER public key); `admit` is the
one check every place that serves a backend makes: signed by a trusted, not deny-listed key,
about exactly this digest, not deny-listed, an evaluation whose verdict lets it be served.
Certificate validity periods are not checked (nothing here is a trusted clock); a key that must
no longer count is deny-listed.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

STATEMENT = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
EVALUATION = "https://slipway.dev/attestation/evaluation/v1"
PROVENANCE = "https://slipway.dev/attestation/provenance/v1"
SERVABLE = ("passed",)  # and "inconclusive" with a person's signed acceptance


class Refused(ValueError):
    """An attestation does not let its backend be served; the message says which check and why."""


# ---- statements and envelopes --------------------------------------------------------------------


def statement(name: str, digest: str, predicate_type: str, predicate: Mapping[str, Any]) -> dict:
    algorithm, _, value = digest.partition(":")
    return {
        "_type": STATEMENT,
        "subject": [{"name": name, "digest": {algorithm: value}}],
        "predicateType": predicate_type,
        "predicate": dict(predicate),
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, so a payload cannot change type."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """sha256 of the DER public key, the way signers are named across Slipway."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def sign(
    content: Mapping[str, Any], private_pem: bytes, certificates: Iterable[bytes] = ()
) -> dict:
    """`content` (a statement) signed with the PEM private key; `certificates` (leaf first,
    PEM) when the key is a certificate's, so that a verifier can walk to a trusted authority."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise Refused("attestations are signed with an elliptic-curve (P-256) key")
    payload = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    chain = [c.decode() if isinstance(c, bytes) else c for c in certificates]
    material = {"x509CertificateChain": chain} if chain else {"publicKey": key_id(key.public_key())}
    return {
        "dsseEnvelope": {
            "payloadType": PAYLOAD_TYPE,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [
                {"keyid": key_id(key.public_key()), "sig": base64.b64encode(sig).decode()}
            ],
        },
        "verificationMaterial": material,
    }


def attestation_digest(attestation: Mapping[str, Any]) -> str:
    """sha256 of the attestation's canonical JSON: the name it is stored and tagged under."""
    data = json.dumps(attestation, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- trust ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """What to trust: public keys by id, certificate authorities, and what is deny-listed."""

    keys: Mapping[str, ec.EllipticCurvePublicKey] = field(default_factory=dict)
    authorities: tuple[x509.Certificate, ...] = ()
    denied_digests: frozenset[str] = frozenset()
    denied_keys: frozenset[str] = frozenset()

    @classmethod
    def load(
        cls,
        key_files: Iterable[Path] = (),
        authority_files: Iterable[Path] = (),
        denied_digests: Iterable[str] = (),
        denied_keys: Iterable[str] = (),
    ) -> Policy:
        keys = {}
        for path in key_files:
            key = serialization.load_pem_public_key(path.read_bytes())
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise Refused(f"{path}: only elliptic-curve public keys can be trusted")
            keys[key_id(key)] = key
        authorities = tuple(
            cert
            for path in authority_files
            for cert in x509.load_pem_x509_certificates(path.read_bytes())
        )
        return cls(keys, authorities, frozenset(denied_digests), frozenset(denied_keys))

    @classmethod
    def from_keyring(
        cls,
        folder: Path,
        key_files: Iterable[Path] = (),
        authority_files: Iterable[Path] = (),
        denied_digests: Iterable[str] = (),
        denied_keys: Iterable[str] = (),
    ) -> Policy:
        """Every `*.pub` key and `*.chain.pem` authority in a keyring folder (none if absent),
        and the given ones."""
        keys = sorted(folder.glob("*.pub")) if folder.is_dir() else []
        chains = sorted(folder.glob("*.chain.pem")) if folder.is_dir() else []
        return cls.load(
            [*keys, *key_files], [*chains, *authority_files], denied_digests, denied_keys
        )


@dataclass(frozen=True)
class Statement:
    """A verified statement and who signed it (the key ids of the signer and its path)."""

    digests: tuple[str, ...]
    predicate_type: str
    predicate: Mapping[str, Any]
    signers: tuple[str, ...]


def _decoded(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise Refused(f"the attestation's {what} is not base64") from None


def _signer(material: Mapping[str, Any], policy: Policy) -> tuple[ec.EllipticCurvePublicKey, list]:
    """The public key to check the signature with, and every key id on its way to the trust."""
    if chain_pem := material.get("x509CertificateChain"):
        try:
            chain = [x509.load_pem_x509_certificate(c.encode()) for c in chain_pem]
        except (ValueError, AttributeError) as e:
            raise Refused(f"the attestation's certificate chain cannot be read: {e}") from None
        ids = [key_id(c.public_key()) for c in chain]
        for child, parent in itertools.pairwise(chain):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                raise Refused(
                    f"the attestation's certificate '{child.subject.rfc4514_string()}' was not "
                    f"issued by the next one in its chain ('{parent.subject.rfc4514_string()}')"
                ) from None
        top = chain[-1]
        for authority in policy.authorities:
            if top == authority:
                return chain[0].public_key(), ids
            try:
                top.verify_directly_issued_by(authority)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return chain[0].public_key(), [*ids, key_id(authority.public_key())]
        raise Refused(
            f"the attestation's certificate '{chain[0].subject.rfc4514_string()}' does not chain "
            "to a trusted certificate authority: add the authority's PEM to the trust"
        )
    wanted = material.get("publicKey")
    if (key := policy.keys.get(wanted)) is None:
        raise Refused(
            f"the attestation is signed by key {wanted}, which is not trusted here: add its "
            "public key to the trust (the keyring, or trust.keys)"
        )
    return key, [wanted]


def verify(attestation: Any, policy: Policy) -> Statement:
    """The statement, once its signature verifies with trusted, not deny-listed keys."""
    if not isinstance(attestation, Mapping) or "dsseEnvelope" not in attestation:
        raise Refused("no signed attestation: a backend is served only with its evaluation's")
    try:
        return _verified(attestation, policy)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, Refused):
            raise
        raise Refused(f"the attestation is malformed ({type(e).__name__}: {e})") from None


def _verified(attestation: Mapping[str, Any], policy: Policy) -> Statement:
    envelope = attestation["dsseEnvelope"]
    key, ids = _signer(attestation.get("verificationMaterial") or {}, policy)
    if denied := [i for i in ids if i in policy.denied_keys]:
        raise Refused(f"the attestation is signed by the deny-listed key {denied[0]}")
    payload_type = envelope.get("payloadType")
    payload = _decoded(envelope.get("payload"), "payload")
    for signature in envelope.get("signatures") or []:
        try:
            key.verify(
                _decoded(signature.get("sig"), "signature"),
                pae(str(payload_type), payload),
                ec.ECDSA(hashes.SHA256()),
            )
            break
        except InvalidSignature:
            continue
    else:
        raise Refused(
            f"the attestation's signature does not verify with {ids[0]}: its statement was "
            "changed after signing, or another key signed it"
        )
    if payload_type != PAYLOAD_TYPE:
        raise Refused(f"the attestation's payload is {payload_type}, not an in-toto statement")
    content = json.loads(payload)
    if content.get("_type") != STATEMENT:
        raise Refused(f"the attestation's payload is not an in-toto Statement v1 ({STATEMENT})")
    digests = tuple(
        f"{algorithm}:{value}"
        for subject in content.get("subject", [])
        for algorithm, value in subject.get("digest", {}).items()
    )
    return Statement(
        digests, content.get("predicateType", ""), content.get("predicate", {}), tuple(ids)
    )


def admit(attestation: Any, digest: str, policy: Policy) -> Statement:
    """Raise Refused unless `attestation` lets the model with `digest` be served: a trusted,
    not deny-listed signature over an evaluation of exactly this digest whose verdict passed
    (or was inconclusive and accepted by a named person), and the digest not deny-listed."""
    if digest in policy.denied_digests:
        raise Refused(f"digest {digest} is deny-listed")
    found = verify(attestation, policy)
    if found.predicate_type != EVALUATION:
        raise Refused(f"the attestation is a {found.predicate_type}, not an evaluation")
    if digest not in found.digests:
        raise Refused(
            f"the evaluation attestation is for {', '.join(found.digests) or 'no digest'}, "
            f"not for {digest}"
        )
    verdict = found.predicate.get("verdict")
    accepted = found.predicate.get("acceptance") or {}
    if verdict not in SERVABLE and not (verdict == "inconclusive" and accepted.get("by")):
        raise Refused(f"the attested evaluation verdict is {verdict!r}, not passed")
    return found
