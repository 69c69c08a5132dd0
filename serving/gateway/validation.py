"""Parse and check an OpenAI request body; a 400 names the offending field.

Only what the gateway relies on, plus common type mistakes, is checked here; the backend
(vLLM) validates the rest and its 400s pass through unchanged.
"""

from __future__ import annotations

from typing import Any

from serving.gateway.codec import JSONDecodeError, dumps, loads
from serving.gateway.endpoints import BOUNDS
from serving.gateway.errors import BadRequest

_NUMBER = (int, float)
# field -> (accepted types, description); bool is refused where a number is expected.
_TYPED: dict[str, tuple[tuple[type, ...], str]] = {
    "stream": ((bool,), "a boolean"),
    "stream_options": ((dict,), "an object"),
    "user": ((str,), "a string"),
    "max_tokens": ((int,), "an integer"),
    "max_completion_tokens": ((int,), "an integer"),
    "max_output_tokens": ((int,), "an integer"),
    "instructions": ((str,), "a string"),
    "n": ((int,), "an integer"),
    "seed": ((int,), "an integer"),
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
    "presence_penalty": (_NUMBER, "a number"),
    "frequency_penalty": (_NUMBER, "a number"),
    "stop": ((str, list), "a string or a list of strings"),
    "echo": ((bool,), "a boolean"),
}


def parse_request(body: bytes, endpoint: str) -> dict[str, Any]:
    """The request as a dict, or BadRequest naming the field that is missing or malformed."""
    if not body:
        raise BadRequest(
            "request body is empty; send a JSON object with 'model' and 'messages'/'prompt'"
        )
    try:
        data = loads(body)
    except JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(
            "'model' is required: a string naming a model (GET /v1/models lists them)",
            param="model",
        )
    _CHECKS[endpoint](data)
    for field, (types, what) in _TYPED.items():
        value = data.get(field)
        if value is not None and (
            not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        ):
            raise BadRequest(f"'{field}' must be {what}, got {_json_type(value)}", param=field)
    options = data.get("stream_options")
    for option in ("include_usage", "continuous_usage_stats"):
        if options is not None and not isinstance(options.get(option, False), bool):
            param = f"stream_options.{option}"
            raise BadRequest(f"'{param}' must be a boolean", param=param)
    return data


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "'messages' is required: a non-empty list of {role, content}", param="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise BadRequest(
                f"'messages[{i}].role' is required: a string such as 'user'",
                param=f"messages[{i}].role",
            )


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
        return
    raise BadRequest(
        "'prompt' is required: a string, a list of strings, or token ids", param="prompt"
    )


def _check_input(data: dict[str, Any]) -> None:
    given = data.get("input")
    if isinstance(given, str) or (isinstance(given, list) and given):
        return
    raise BadRequest(
        "'input' is required: a string or a non-empty list (of input items for /v1/responses; "
        "of strings or token ids for /v1/embeddings)",
        param="input",
    )


def _check_tokenize(data: dict[str, Any]) -> None:
    if "messages" in data:
        _check_messages(data["messages"])
    elif not isinstance(data.get("prompt"), str):
        raise BadRequest(
            "'prompt' (a string) or 'messages' is required: the text to tokenize", param="prompt"
        )


def _check_tokens(data: dict[str, Any]) -> None:
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise BadRequest("'tokens' is required: a list of token ids", param="tokens")


_CHECKS = {
    "chat": lambda data: _check_messages(data.get("messages")),
    "completions": lambda data: _check_prompt(data.get("prompt")),
    "responses": _check_input,
    "embeddings": _check_input,
    "tokenize": _check_tokenize,
    "detokenize": _check_tokens,
}


def _json_type(value: Any) -> str:
    return {
        bool: "a boolean",
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _texts(data: dict[str, Any], endpoint: str) -> list[Any]:
    """The request's prompt texts as given: strings, content part lists or token ids."""
    if endpoint == "detokenize":
        return []
    if endpoint in ("responses", "embeddings"):
        given = data["input"]
        items = [given] if isinstance(given, str) else given
        texts = [i.get("content") if isinstance(i, dict) else i for i in items]
        return [data["instructions"], *texts] if data.get("instructions") else texts
    if "messages" in data:  # chat, or tokenize with messages
        return [m.get("content") for m in data["messages"]]
    prompt = data["prompt"]
    return [prompt] if isinstance(prompt, str) else prompt


def prompt_text(data: dict[str, Any], endpoint: str) -> str | None:
    """The prompt as text for the usage log (message contents joined by newlines)."""
    return "\n".join(t for t in _texts(data, endpoint) if isinstance(t, str)) or None


def prompt_count(data: dict[str, Any], endpoint: str) -> int:
    """How many prompts the request holds: a completions prompt may be a list of them (an
    embeddings input too, but it has no choices to group)."""
    prompt = data.get("prompt") if endpoint == "completions" else None
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def asked_completion(data: dict[str, Any], endpoint: str) -> tuple[int, int | None]:
    """Choices per prompt (n) and the most completion tokens the request allows in all:
    max_tokens x n x prompts, None when it names no max_tokens. Clamped at 0 and 1: a negative
    max_tokens or n is refused by vLLM only after admission."""
    n = max(1, data.get("n") or 1)
    if endpoint not in BOUNDS:
        return 1, 0  # embeddings, tokenize, detokenize generate nothing
    named = [data[f] for f in BOUNDS[endpoint] if data.get(f) is not None]
    if not named:
        return n, None
    return n, max(0, *named) * n * prompt_count(data, endpoint)


def prompt_bytes(data: dict[str, Any], endpoint: str) -> int:
    """The prompt's size: UTF-8 bytes of its text (message contents and text parts, or prompt
    strings, all prompts together), and of the JSON a chat template renders besides that text
    (`_structured`); a prompt given as token ids counts one per id, the fewest bytes an id can
    stand for."""
    texts = _texts(data, endpoint)
    if endpoint in ("completions", "embeddings"):  # strings, token ids, or lists of either
        return sum(len(t.encode()) if isinstance(t, str) else _ids(t) for t in texts)
    structured = _structured(data, endpoint)
    extra = sum(len(dumps(part)) for part in structured) if structured else 0
    return sum(_text_bytes(t) for t in texts) + extra


def _structured(data: dict[str, Any], endpoint: str) -> list[Any]:
    """What a chat template renders into the prompt besides message text: tool definitions, an
    assistant's tool calls, and Responses' input items that carry no content (function calls,
    their outputs). The template writes them out as JSON, so its bytes bound their tokens too."""
    parts = [data["tools"]] if data.get("tools") else []
    if endpoint == "responses":
        given = data["input"]
        if isinstance(given, list):
            parts += [i for i in given if isinstance(i, dict) and i.get("content") is None]
    elif "messages" in data:
        parts += [m["tool_calls"] for m in data["messages"] if m.get("tool_calls")]
    return parts


def _text_bytes(content: Any) -> int:
    if isinstance(content, str):
        return len(content.encode())
    if isinstance(content, list):
        texts = (p.get("text") for p in content if isinstance(p, dict))
        return sum(len(t.encode()) for t in texts if isinstance(t, str))
    return 0


def _ids(prompt: Any) -> int:
    return len(prompt) if isinstance(prompt, list) else 1
