"""The gateway's trust: the keys and authorities whose evaluation attestations it accepts, and the
deny-list, read from its home's keyring and `denied.json` plus the config's `trust` section.

The gateway holds no private key. Every backend that enters the routing table, from the config's
seed, the state store (at start and on every change another instance wrote) or the admin API,
passes `admit` first. A change to the keyring or the deny-list on disk is picked up by the table
sync's poll, which then checks the routes in use again, so a deny-listed digest or key stops
being served without a restart.
"""

from __future__ import annotations

import json
from pathlib import Path

from configs.gateway import BackendSpec, TrustSpec
from serving.attestation import Policy, Refused, admit

DENIED = "denied.json"


def read_denied(keys_dir: Path) -> tuple[list[str], list[str]]:
    """The deny-list `slipway deny` writes: (digests, key ids); empty when there is none."""
    path = keys_dir / DENIED
    if not path.is_file():
        return [], []
    data = json.loads(path.read_text())
    return list(data.get("digests", [])), list(data.get("keys", []))


class Trust:
    """The policy in force, rebuilt when the keyring or the deny-list on disk change."""

    def __init__(self, spec: TrustSpec, keys_dir: Path) -> None:
        self.spec = spec
        self.keys_dir = keys_dir
        self._stamp: tuple | None = None  # nothing read yet
        self.policy = Policy()
        self.reload()

    def _current_stamp(self) -> tuple:
        keyring = self.keys_dir / "trusted"
        files = [self.keys_dir / DENIED, *(sorted(keyring.iterdir()) if keyring.is_dir() else [])]
        return tuple((str(p), p.stat().st_mtime_ns) for p in files if p.is_file())

    def reload(self) -> bool:
        """Read the trust again if its files changed; whether they had."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # a file that cannot be read is reported once, not on every poll
        digests, keys = read_denied(self.keys_dir)
        self.policy = Policy.from_keyring(
            self.keys_dir / "trusted",
            key_files=self.spec.keys,
            authority_files=self.spec.authorities,
            denied_digests=[*digests, *self.spec.deny_digests],
            denied_keys=[*keys, *self.spec.deny_keys],
        )
        return True

    def check(self, model: str, backend: BackendSpec) -> None:
        """Raise Refused, naming the route and the backend, unless it may be served."""
        try:
            admit(backend.attestation, backend.digest, self.policy)
        except Refused as e:
            raise Refused(f"route '{model}', backend v{backend.version}: {e}") from None
