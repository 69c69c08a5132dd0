"""What the release did with one variant. Its own module, so that a variant's flow run, loaded
from its entrypoint's file, returns a class the release that started it can load (the result
crosses processes through Prefect's result storage)."""

from __future__ import annotations

from dataclasses import dataclass

from configs.models import Variant
from evaluation.quality.gates import QualityResult, Verdict
from tasks.evaluate import Trial
from tasks.quantize import VariantBuild
from tasks.registry import RegisteredVersion


@dataclass(frozen=True)
class Outcome:
    """What the release did with one variant: registered (with its verdict), skipped or failed."""

    variant: Variant
    status: str  # registered | skipped | failed
    reason: str = ""
    build: VariantBuild | None = None
    version: RegisteredVersion | None = None
    quality: QualityResult | None = None
    trial: Trial | None = None  # None when an earlier run already registered this digest
    verdict: Verdict | None = None

    def line(self) -> str:
        if self.version is None:
            return f"{self.variant.label}: {self.status}: {self.reason}"
        v = self.version
        if not v.created:
            return f"{self.variant.label}: v{v.version} {v.digest} (already registered)"
        verdict = self.verdict.status if self.verdict else "not judged"
        return f"{self.variant.label}: v{v.version} {v.digest} eval {verdict}"
