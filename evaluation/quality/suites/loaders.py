"""Load Slipway's shipped suite data for lm-eval (`custom_dataset:` / `process_docs:` hooks).

The YAMLs name these functions instead of `dataset_path: json` + `data_files:` because lm-eval
hands data_files to `datasets` unchanged, which resolves relative paths against the working
directory; here they are resolved against this folder, so the suites run from anywhere, offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA = Path(__file__).resolve().parent / "data"
# The quick (regression) variants keep every QUICK_STRIDE-th item: a spread over all categories.
QUICK_STRIDE = 4


def _test_split(rows: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _jsonl(name: str) -> list[dict[str, Any]]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# lm-eval calls custom_dataset(**task_metadata, **dataset_kwargs); none of them matter here.
def knowledge(**_: Any) -> datasets.DatasetDict:
    return _test_split(_jsonl("knowledge.jsonl"))


def short_answer(**_: Any) -> datasets.DatasetDict:
    return _test_split(_jsonl("short_answer.jsonl"))


def perplexity(**_: Any) -> datasets.DatasetDict:
    lines = (DATA / "perplexity.txt").read_text(encoding="utf-8").splitlines()
    return _test_split([{"text": line} for line in lines if line.strip()])


def quick(docs: datasets.Dataset) -> datasets.Dataset:
    return docs.select(range(0, len(docs), QUICK_STRIDE))


def quick_perplexity(docs: datasets.Dataset) -> datasets.Dataset:
    """Three whole documents: perplexity is per token, so fewer documents make it cheaper,
    not less comparable."""
    return docs.select(range(min(3, len(docs))))
