#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the whole test suite (slow tests included).
# Fails on any failing test, and on "no tests collected" (pytest exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check .
ruff format --check .
set +e
python -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
