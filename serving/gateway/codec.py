"""JSON for the hot path: orjson when installed (several times faster), else the standard
library."""

from __future__ import annotations

from typing import Any

try:
    import orjson

    loads = orjson.loads
    JSONDecodeError: type[ValueError] = orjson.JSONDecodeError

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover - orjson is in the core lock
    import json

    loads = json.loads
    JSONDecodeError = json.JSONDecodeError

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
