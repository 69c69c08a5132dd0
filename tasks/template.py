"""The chat-template gate at release: the pulled model's template, judged against the previous
release of the model (its digest from the registry, its text from the store when the files are
on this node) and the digests the model config approves. A failed gate fails the release before
anything is built, with the findings and the diff."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from configs.home import Home
from configs.models import ModelConfig
from evaluation.quality.chat_template import TemplateCheck, check, extract
from tasks.registry import Registry
from tasks.store import Entry, Store


class TemplateRefused(RuntimeError):
    """The chat template may not be released; the message holds the findings and the diff."""


def previous_template(registry: Registry, name: str) -> tuple[str, str | None] | None:
    """The newest registered version's template digest, and its text if its files are here."""
    for version in reversed(registry.versions(name)):
        tags = registry.tags(name, version)
        if not (recorded := tags.get("chat_template_sha256")):
            continue
        entry = Store(registry.home, name).entry(tags["digest"])
        return recorded, extract(entry.weights) if entry.exists() else None
    return None


def check_template(base: Entry, config: ModelConfig, home: Home) -> TemplateCheck:
    registry = Registry(home)
    return check(
        extract(base.weights),
        previous_template(registry, config.name),
        config.chat_template.approved,
    )


@task(name="chat-template", cache_policy=NO_CACHE)
def template_task(base: Entry, config: ModelConfig, home: Home) -> TemplateCheck:
    """The gate's decision as a Prefect artifact; raises TemplateRefused when it failed."""
    result = check_template(base, config, home)
    create_markdown_artifact(f"```\n{result.report()}\n```", key="chat-template")
    if not result.passed:
        raise TemplateRefused(f"the release of {config.name} is refused:\n{result.report()}")
    return result
