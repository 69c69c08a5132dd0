"""The circuit breaker of one server (a replica of a version): stop sending it traffic while it
keeps failing.

`threshold` consecutive failed attempts open the circuit for `open_s` seconds; then one request
at a time may probe it (half-open). The probe's success closes the circuit, its failure opens it
again for another `open_s`. A probe that never reports (its request was cancelled) stops blocking
after `open_s`, so a lost probe cannot keep a backend out of rotation for good.

Times are monotonic seconds passed in by the caller, so the breaker itself reads no clock.
"""

from __future__ import annotations


class Breaker:
    __slots__ = ("failures", "open_s", "opened_at", "probe_at", "threshold")

    def __init__(self, threshold: int, open_s: float) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self.failures = 0
        self.opened_at: float | None = None
        self.probe_at: float | None = None

    def due(self, now: float) -> bool:
        """Whether `allows` would let a request through now (it claims the probe; this does not)."""
        if self.opened_at is None:
            return True
        if now - self.opened_at < self.open_s:
            return False
        return self.probe_at is None or now - self.probe_at >= self.open_s

    def allows(self, now: float) -> bool:
        """Whether a request may go to the server now; a half-open circuit lets one through."""
        if self.opened_at is None:
            return True
        if not self.due(now):
            return False
        self.probe_at = now
        return True

    def retry_after(self, now: float) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.open_s - now)

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probe_at = None

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.probe_at is not None or self.failures >= self.threshold:
            self.opened_at = now
            self.probe_at = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.probe_at is not None else "open"
