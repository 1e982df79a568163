#!/usr/bin/env bash
# Install everything from nothing and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/setup_vllm_venv.sh
exec .venv/bin/python -m pytest -q "$@"
