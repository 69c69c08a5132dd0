"""The gateway: the always-on OpenAI-compatible service in front of vLLM, and nothing else.

Imports only configs and its own modules (see the layer contract in pyproject.toml)."""
