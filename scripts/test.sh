#!/usr/bin/env bash
# Install everything from nothing, check formatting and lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/setup_vllm_venv.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
# On 2 workers, a module's tests on one worker and the longest modules first (tests/conftest.py).
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
