#!/usr/bin/env bash
# The venv that runs benchmarks/kvpress/generate.py: NVIDIA's kvpress beside the CPU build of torch.
#
#   bash benchmarks/kvpress/setup_venv.sh          # creates benchmarks/kvpress/.venv (KVPRESS_VENV to change)
#
# kvpress 0.5.5 requires transformers>=4.56.0,<5.3 (plus torch>=2.3.1, accelerate, datasets, peft,
# pandas, fire, cachetools, requests); transformers 5.2.0 is the newest release it admits. lavakv
# does not import under 5.2.0 (it needs transformers.cache_utils.get_layer_types_and_kwargs, added
# later), so lavakv is not installed here: benchmarks/kvpress/engine.py runs lavakv's half with the
# main .venv (transformers 5.23) and starts generate.py here on the same model and token ids.
# torch is installed first and pinned for every later step, so that no dependency pulls a CUDA
# build: 2.13.0 is the CPU wheel that lies on this machine's disk.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${KVPRESS_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

TORCH_VERSION=2.13.0
KVPRESS_VERSION=0.5.5
TRANSFORMERS_VERSION=5.2.0

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
pin="$(mktemp)"
trap 'rm -f "$pin"' EXIT
echo "torch==$TORCH_VERSION" >"$pin"

"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" -c "$pin" "kvpress==$KVPRESS_VERSION" "transformers==$TRANSFORMERS_VERSION"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md

import torch

assert not torch.version.cuda, f"expected the CPU build of torch, got CUDA {torch.version.cuda}"
for name in ("torch", "transformers", "kvpress", "accelerate", "datasets", "peft", "numpy", "tokenizers"):
    print(f"{name}=={md.version(name)}")
PY
