#!/usr/bin/env bash
# Creates the virtual environment and installs everything the toolkit and its tests need.
# Usage: scripts/setup_env.sh [python] [venv_dir]
set -euo pipefail
PYTHON=${1:-python3}
VENV=${2:-.venv}
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade "pip<26" wheel "setuptools<81"
"$PIP" install -q -r requirements.txt
# mmcv 2.1.0 (for mmdet 3.3.0) is source-only: build it once, cache the wheel.
bash scripts/build_mmcv.sh "$VENV"
"$PIP" install -q --no-deps mmdet==3.3.0
# mmdet is installed without its pinned deps (they would pull another mmcv); check it imports.
"$VENV/bin/python" -c "import mmdet.apis; from mmdet.registry import MODELS; from mmcv.ops import nms"
"$PIP" install -q --no-deps -e .
