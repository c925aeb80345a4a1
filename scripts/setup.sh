#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch (CPU build), the
# dependencies, and sparamx built in place (its native extension compiled by setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet setuptools wheel ninja
# --no-build-isolation: build the extension against the torch installed above. The dev
# extra brings the test tools and the server's packages (serve extra) with the openai client.
python -m pip install --quiet --no-build-isolation -e ".[dev]"
python -c "import sparamx; print('sparamx kernels:', sparamx.kernel_info()['decode'], '(decode),', sparamx.kernel_info()['prefill'], '(prefill)')"
