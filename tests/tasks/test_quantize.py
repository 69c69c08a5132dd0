"""Quantize: the config rules, the calibration data, bf16 copies, and real llmcompressor builds and
failures in the quant environment. Serving the built variants is tested in
tests/serving/test_vllm.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict

import pytest
import torch
from pydantic import ValidationError

from configs.home import REPO
from configs.loader import ConfigError
from configs.models import Calibration, DirSource, Variant, load_model_config
from tasks import llmcompressor_job, quantize
from tasks.hub import pull
from tasks.quantize import QuantizeError, build, build_key, build_variant, is_bf16
from tasks.store import Store

SMALL = Calibration(samples=8, seq_len=128)  # minutes on SmolLM2 are seconds on the tiny model


# ---- config --------------------------------------------------------------------------------------


def test_unknown_recipe_is_rejected_by_the_config(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: m\nsource: hf://org/m\nvariants:\n  - recipe: gptq-w3a16\n")
    with pytest.raises(
        ConfigError, match=r"variants\.0\.recipe: Input should be 'bf16', 'gptq-w4a16'"
    ):
        load_model_config(path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"recipe": "gptq-w4a16", "group_size": 48}, "48 must be a power of two"),
        ({"recipe": "gptq-w4a16", "group_size": 0}, "0 must be a power of two"),
        (
            {"recipe": "gptq-w8a8", "group_size": 64},
            "group_size applies to gptq-w4a16 and awq-w4a16",
        ),
        (
            {"recipe": "fp8-dynamic", "smoothing_strength": 0.8},
            "smoothing_strength applies to gptq-w8a8",
        ),
        ({"recipe": "bf16", "name": "a/b"}, "no spaces, slashes"),
        (
            {"recipe": "gptq-w8a8", "calibration": {"source": "data.csv"}},
            "must be a .txt or .jsonl",
        ),
        (
            {"recipe": "gptq-w8a8", "calibration": {"source": "hf://org/x"}},
            "hf://datasets/org/name",
        ),
    ],
)
def test_variant_options_are_checked(fields, message):
    with pytest.raises(ValidationError, match=message):
        Variant(**fields)


def test_variant_options_that_fit():
    assert Variant(recipe="awq-w4a16", group_size=32).group_size == 32
    assert Variant(recipe="gptq-w8a8", smoothing_strength=0.8).label == "gptq-w8a8"
    hub = Calibration(source="hf://datasets/org/corpus:train[:1%]")
    assert hub.path is None
    assert Calibration().path == REPO / "evaluation/datasets/calibration.jsonl"


# ---- calibration data ----------------------------------------------------------------------------


def test_the_default_calibration_file_is_varied_english_text():
    lines = Calibration().path.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) >= 64
    assert len(set(texts)) == len(texts)
    assert all(len(t.split()) >= 40 for t in texts)


def test_calibration_windows_are_equal_length_int_lists(tiny_model_source):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_source)
    texts = llmcompressor_job.read_texts(str(Calibration().path), 0, tokenizer)
    data = llmcompressor_job.calibration_dataset(texts, tokenizer, samples=5, seq_len=64)
    assert len(data) == 5
    assert {len(row) for row in data["input_ids"]} == {64}
    assert all(isinstance(t, int) for row in data["input_ids"] for t in row)
    with pytest.raises(ValueError, match="fewer than one window of seq_len 64"):
        llmcompressor_job.calibration_dataset(["hi"], tokenizer, samples=5, seq_len=64)


def test_default_group_size_divides_every_quantized_linear():
    smollm_like = torch.nn.ModuleDict(
        {
            "q_proj": torch.nn.Linear(576, 576),
            "down_proj": torch.nn.Linear(1536, 576),
            "lm_head": torch.nn.Linear(576, 49152),
        }
    )
    assert llmcompressor_job.default_group_size(smollm_like) == 64
    assert llmcompressor_job.default_group_size(torch.nn.Linear(256, 8)) == 128
    with pytest.raises(ValueError, match="set group_size in the variant"):
        llmcompressor_job.default_group_size(torch.nn.Linear(100, 8))


# ---- bf16 ----------------------------------------------------------------------------------------


def test_bf16_copies_a_bf16_base_without_a_subprocess(tiny_model, home, tmp_path):
    out = tmp_path / "variants" / "bf16" / "weights"
    build = build_variant(tiny_model, Variant(recipe="bf16"), out, home)
    assert is_bf16(out)
    assert (out / "model.safetensors").read_bytes() == (
        tiny_model / "model.safetensors"
    ).read_bytes()
    assert (out / "tokenizer.json").is_file() and (out / "LICENSE").is_file()
    assert build.compression_ratio == 1.0
    assert build.peak_rss_bytes is None and build.calibration_sha256 is None
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_build_is_reused_only_for_the_same_base_digest_recipe_and_calibration(
    tiny_model, home, tmp_path, monkeypatch
):
    store = Store(home, "t")
    base, _ = pull(DirSource(path=tiny_model), store, home)
    variant = Variant(recipe="fp8-dynamic")
    # An earlier fp8 build of this base, as `build` records it (its bytes: any committed entry).
    with store.staging() as work:
        shutil.copytree(tiny_model, work / "weights")
        (work / "weights" / "marker.json").write_text("{}")
        earlier, _ = store.commit(work / "weights", "dir://x", "local")
    record = build_variant(tiny_model, Variant(recipe="bf16"), tmp_path / "b", home)
    key = build_key(base.digest, variant, None)
    store.record_build(key, earlier.digest, asdict(record) | {"out_dir": None, "log_path": None})

    def no_job(*args, **kwargs):
        raise AssertionError("a reusable build ran llmcompressor again")

    monkeypatch.setattr(quantize, "run_job", no_job)
    built, entry, _ = build(base, variant, store, home)
    assert entry == earlier and built.out_dir == earlier.weights  # reused, nothing rebuilt
    other = Variant(recipe="fp8-dynamic", name="fp8-b")  # another spec: another key
    with pytest.raises(AssertionError, match="ran llmcompressor again"):
        build(base, other, store, home)
    assert list((store.root / ".staging").iterdir()) == []


def test_bf16_of_a_bf16_base_is_the_base_itself(tiny_model, home):
    store = Store(home, "t")
    base, _ = pull(DirSource(path=tiny_model), store, home)
    built, entry, _ = build(base, Variant(recipe="bf16"), store, home)
    assert entry == base and built.out_dir == base.weights
    assert store.entries() == [base]  # no copy of the same bytes


def test_missing_base_or_calibration_file_fails_before_any_job(tiny_model, home, tmp_path):
    with pytest.raises(
        QuantizeError, match=re.escape("holds no config.json: pull the model first")
    ):
        build_variant(tmp_path / "nothing", Variant(recipe="fp8-dynamic"), tmp_path / "out", home)
    variant = Variant(recipe="gptq-w8a8", calibration={"source": str(tmp_path / "missing.jsonl")})
    with pytest.raises(QuantizeError, match=re.escape("missing.jsonl does not exist")):
        build_variant(tiny_model, variant, tmp_path / "out", home)
    assert not (tmp_path / "out").exists()


# ---- real llmcompressor builds -------------------------------------------------------------------


@pytest.mark.slow
def test_gptq_w4a16_builds_a_pack_quantized_checkpoint(tiny_model_source, home, tmp_path):
    out = tmp_path / "gptq-w4a16" / "weights"
    build = build_variant(
        tiny_model_source, Variant(recipe="gptq-w4a16", calibration=SMALL), out, home
    )

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"
    assert config["ignore"] == ["lm_head"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["strategy"]) == (4, "int", "group")
    assert weights["group_size"] == build.group_size == 128  # hidden 128 and intermediate 256
    assert build.quantization_config == config
    # A vLLM-loadable directory: weights, config, tokenizer and the base's licence.
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "LICENSE"):
        assert (out / name).is_file(), name
    assert build.calibration_sha256 == hashlib.sha256(SMALL.path.read_bytes()).hexdigest()
    assert build.compression_ratio > 1.5  # 4-bit layers; embeddings and lm_head stay bf16
    assert build.size_bytes == sum(p.stat().st_size for p in out.iterdir())
    assert build.peak_rss_bytes > 100 * 2**20 and build.wall_s > 0
    assert build.log_path.parent == home.logs and "Quantizing" in build.log_path.read_text()


@pytest.mark.slow
def test_a_failing_job_raises_with_its_reason_and_log_tail(tiny_model_source, home, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    variant = Variant(recipe="gptq-w8a8", calibration={"source": str(short), "seq_len": 128})
    out = tmp_path / "w8a8" / "weights"
    with pytest.raises(QuantizeError) as caught:
        build_variant(tiny_model_source, variant, out, home)
    message = str(caught.value)
    assert "gptq-w8a8 failed: ValueError: the calibration data holds" in message
    assert "lower calibration.seq_len" in message
    assert "Traceback" in message  # the tail of the job's log
    assert str(home.logs) in message
    assert not out.exists() and not [p for p in out.parent.iterdir()]  # nothing half-built


@pytest.mark.slow
def test_a_job_past_its_time_limit_is_killed(tiny_model_source, home, tmp_path):
    out = tmp_path / "fp8" / "weights"
    with pytest.raises(QuantizeError, match="fp8-dynamic failed: timed out after 2 s"):
        build_variant(tiny_model_source, Variant(recipe="fp8-dynamic"), out, home, timeout_s=2)
    assert not out.exists()
