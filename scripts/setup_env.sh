#!/usr/bin/env bash
# Creates the virtual environment and installs one or more layers of dependencies into it.
# Usage: scripts/setup_env.sh [python] [venv_dir] [layer ...]      (default layers: core det yolo test)
#   core  torch, torchvision, timm, numpy, matplotlib, scikit-learn, open_clip, ... (requirements.txt)
#         and this package (editable). Wheels only: nothing is compiled. Enough for `make demo`,
#         classification and CLIP.
#   det   detection: mmengine, pycocotools, ... (requirements-det.txt), mmcv 2.1.0 built from source
#         once by scripts/build_mmcv.sh (10-50 minutes on 2 cores, then cached), mmdet 3.3.0.
#   yolo  Ultralytics (AGPL-3.0, requirements-yolo.txt) and the original anchor-based YOLOv5 model
#         code: the yolov5 7.0.14 package without its declared dependencies (cloud/hub clients
#         pinned below what core needs); the model code imports only pandas, seaborn and
#         pkg_resources besides core, which requirements-yolo.txt lists.
#   test  pytest (requirements-test.txt).
# The Makefile calls it once per layer and stamps each layer ($VENV/.core-installed, ...).
set -euo pipefail
PYTHON=${1:-python3}
VENV=${2:-.venv}
shift $(( $# < 2 ? $# : 2 ))
LAYERS=("$@")
[ ${#LAYERS[@]} -gt 0 ] || LAYERS=(core det yolo test)
cd "$(dirname "$0")/.."
for layer in "${LAYERS[@]}"; do
    case "$layer" in core|det|yolo|test) ;; *) echo "setup_env.sh: unknown layer '$layer' (use core, det, yolo or test)" >&2; exit 2;; esac
done
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"

for layer in "${LAYERS[@]}"; do
    start=$(date +%s)
    echo "== installing the '$layer' layer into $VENV"
    case "$layer" in
    core)
        "$PIP" install -q -r requirements.txt
        "$PIP" install -q --no-deps --no-build-isolation -e .
        "$VENV/bin/python" -c "import torch, torchvision, timm, matplotlib, sklearn, qwt_core"
        ;;
    det)
        # mmcv 2.1.0 builds only with setuptools<81 and without build isolation.
        "$PIP" install -q --upgrade "pip<26" wheel "setuptools<81"
        "$PIP" install -q -r requirements-det.txt
        # mmcv 2.1.0 (for mmdet 3.3.0) is source-only: build it once, cache the wheel.
        bash scripts/build_mmcv.sh "$VENV"
        # mmdet without its pinned deps (they would pull another mmcv); check that it imports.
        "$PIP" install -q --no-deps mmdet==3.3.0
        "$VENV/bin/python" -c "import mmdet.apis; from mmdet.registry import MODELS; from mmcv.ops import nms"
        ;;
    yolo)
        "$PIP" install -q -r requirements-yolo.txt
        "$PIP" install -q --no-deps yolov5==7.0.14
        "$VENV/bin/python" -c "import ultralytics; from yolov5.models.yolo import DetectionModel"
        ;;
    test)
        "$PIP" install -q -r requirements-test.txt
        ;;
    esac
    echo "== '$layer' layer installed in $(( $(date +%s) - start ))s"
done
