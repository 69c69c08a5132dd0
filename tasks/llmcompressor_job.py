"""Build one quantized variant with llmcompressor; runs in the QUANT environment, not in core.

    python -m tasks.llmcompressor_job --spec spec.json

The spec (written by tasks/quantize.py) names the recipe, the base model dir, the output dir, the
group size, the calibration source and where to write the result JSON. The output dir receives a
compressed-tensors checkpoint with its tokenizer. On failure the result JSON holds `error` (one
line: the reason) and the traceback goes to stderr. Imports only the standard library and the quant
environment's torch / transformers / llmcompressor / datasets: its pins conflict with core's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

# Calibrated recipes: GPTQ/AWQ/SmoothQuant need activations; FP8_DYNAMIC and bf16 need no data.
CALIBRATED = {"gptq-w4a16", "awq-w4a16", "gptq-w8a8"}
GROUP_SIZES = (128, 64, 32)
IGNORE = ["lm_head"]  # the output head stays in full precision: quantizing it costs most quality


def log(message: str) -> None:
    print(f"[llmcompressor_job] {message}", file=sys.stderr, flush=True)


# ---- calibration data ----------------------------------------------------------------------------


def read_texts(source: str, needed_tokens: int, tokenizer: Any) -> list[str]:
    """Texts from a local .jsonl ({"text": ...} per line) or .txt (paragraphs split by blank
    lines) file, or from `hf://datasets/org/name[:split]` (streamed until enough tokens are
    read)."""
    if source.startswith("hf://datasets/"):
        from datasets import load_dataset

        name, _, split = source.removeprefix("hf://datasets/").partition(":")
        texts, tokens = [], 0
        for row in load_dataset(name, split=split or "train", streaming=True):
            text = row.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{source}: rows need a string 'text' column; got {sorted(row)}")
            texts.append(text)
            tokens += len(tokenizer(text)["input_ids"])
            if tokens >= needed_tokens:
                break
        return texts
    path = Path(source)
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{n}: each line must be a JSON object with a 'text'")
                texts.append(record["text"])
        return texts
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def calibration_dataset(texts: list[str], tokenizer: Any, samples: int, seq_len: int) -> Any:
    """Equal-length windows of token ids: the texts are tokenized one by one (each keeps its BOS),
    concatenated and cut into `seq_len` pieces. Ragged rows would be padded by the collator with a
    float tail, which the embedding rejects."""
    from datasets import Dataset

    ids: list[int] = []
    for text in texts:
        ids.extend(int(t) for t in tokenizer(text)["input_ids"])
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
    if not windows:
        raise ValueError(
            f"the calibration data holds {len(ids)} tokens, fewer than one window of seq_len "
            f"{seq_len}: add text or lower calibration.seq_len"
        )
    if len(windows) < samples:
        log(f"calibration data gives {len(windows)} windows of {seq_len} tokens, not {samples}")
    return Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * seq_len for _ in windows]}
    )


# ---- recipes -------------------------------------------------------------------------------------


def default_group_size(model: Any) -> int:
    """The largest of 128/64/32 dividing every quantized Linear's input dim (SmolLM2 576: 64)."""
    import torch

    dims = {
        m.in_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in IGNORE
    }
    for size in GROUP_SIZES:
        if all(d % size == 0 for d in dims):
            return size
    raise ValueError(
        f"no group size of {GROUP_SIZES} divides every Linear input dim {sorted(dims)}: "
        "set group_size in the variant"
    )


def w4a16_groups(group_size: int) -> dict[str, Any]:
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group_size,
    }
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def build_recipe(spec: dict[str, Any], model: Any) -> tuple[list[Any], dict[str, Any]]:
    """The llmcompressor modifiers for the spec's recipe, and facts to report about them."""
    recipe = spec["recipe"]
    if recipe in ("gptq-w4a16", "awq-w4a16"):
        group_size = spec.get("group_size") or default_group_size(model)
        groups = w4a16_groups(group_size)
        if recipe == "gptq-w4a16":
            from llmcompressor.modifiers.quantization import GPTQModifier

            return [GPTQModifier(config_groups=groups, ignore=IGNORE)], {"group_size": group_size}
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=IGNORE)], {
            "group_size": group_size
        }
    if recipe == "gptq-w8a8":
        from llmcompressor.modifiers.quantization import GPTQModifier

        modifiers: list[Any] = []
        if spec.get("smoothing_strength"):
            from llmcompressor.modifiers.transform import SmoothQuantModifier

            modifiers.append(SmoothQuantModifier(smoothing_strength=spec["smoothing_strength"]))
        modifiers.append(GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE))
        return modifiers, {"smoothing_strength": spec.get("smoothing_strength")}
    if recipe == "fp8-dynamic":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE)], {}
    raise ValueError(f"unknown recipe {recipe!r}")


def allow_awq_without_accelerator() -> None:
    """AWQ pins cached activations for faster host-to-device copies; with no accelerator pinning
    fails ("Cannot access accelerator device"), and there is nothing to copy to anyway."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


# ---- the job -------------------------------------------------------------------------------------


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, out_dir = spec["recipe"], Path(spec["out_dir"])
    log(f"loading {spec['model_dir']}")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16)
    facts: dict[str, Any] = {}
    if recipe != "bf16":
        from llmcompressor import oneshot

        modifiers, facts = build_recipe(spec, model)
        dataset = None
        if recipe in CALIBRATED:
            cal = spec["calibration"]
            texts = read_texts(cal["source"], cal["samples"] * cal["seq_len"], tokenizer)
            dataset = calibration_dataset(texts, tokenizer, cal["samples"], cal["seq_len"])
            facts["calibration_samples"] = len(dataset)
            facts["calibration_sha256"] = hashlib.sha256("\n\n".join(texts).encode()).hexdigest()
            if recipe == "awq-w4a16":
                allow_awq_without_accelerator()
        log(f"running {recipe} ({', '.join(type(m).__name__ for m in modifiers)})")
        started = time.monotonic()
        kwargs: dict[str, Any] = {}
        if dataset is not None:
            kwargs = {
                "dataset": dataset,
                "num_calibration_samples": len(dataset),
                "max_seq_length": spec["calibration"]["seq_len"],
            }
        oneshot(model=model, processor=tokenizer, recipe=modifiers, **kwargs)
        facts["oneshot_s"] = round(time.monotonic() - started, 2)
    log(f"saving to {out_dir}")
    # llmcompressor wraps save_pretrained to write compressed-tensors; bf16 is a plain save.
    model.save_pretrained(out_dir, **({} if recipe == "bf16" else {"save_compressed": True}))
    tokenizer.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    return {"recipe": recipe, "quantization_config": config.get("quantization_config"), **facts}


def die_with_parent() -> None:
    """If the process that started the job dies (killed, crashed), the kernel ends the job too."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="the JSON spec to build")
    spec = json.loads(parser.parse_args(argv).spec.read_text())
    result_path = Path(spec["result"])
    try:
        result = run(spec)
    except BaseException as e:
        result_path.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise
    result_path.write_text(json.dumps(result, indent=2))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
