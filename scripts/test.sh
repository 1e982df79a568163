#!/usr/bin/env bash
# Install everything from nothing, check formatting and lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/setup_vllm_venv.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest -q "$@"
fi
# The whole suite: the tests that use both cores by themselves (marked `alone`: the SmolLM2 demo) first, then the
# rest on two workers, whose tests mostly leave a core idle (imports, subprocesses, the tiny model).
status=0
.venv/bin/python -m pytest -q -m alone || status=$?
.venv/bin/python -m pytest -q -m "not alone" -n 2 --dist loadfile || status=$?
exit "$status"
