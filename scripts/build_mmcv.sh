#!/usr/bin/env bash
# Build (once) and install mmcv 2.1.0 with its CPU/CUDA ops for mmdet 3.3.0.
# PyPI has only the source of mmcv 2.1.0. It compiles against torch 2.14 headers only with
# -std=c++20, and only with setuptools<81 and --no-build-isolation. The wheel is cached under
# ${XDG_CACHE_HOME:-~/.cache}/qwt-toolkit/wheels/torch-<torch version>-<cpu|cuda>/ (the compiled ops
# are tied to the torch build; mmcv builds CUDA ops when torch sees a GPU or FORCE_CUDA=1); a wheel
# placed directly in .../qwt-toolkit/wheels/ is tried too.
# Usage: scripts/build_mmcv.sh [venv_dir]     (FORCE_CUDA=1 to build the CUDA ops, MAX_JOBS=n)
set -euo pipefail
VENV=$(cd "${1:-.venv}" && pwd)
PY="$VENV/bin/python"
PIP="$VENV/bin/pip"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/qwt-toolkit/wheels"
VERSION=2.1.0

mmcv_ok() {
    "$PY" -c "import mmcv, sys; from mmcv.ops import nms; sys.exit(0 if mmcv.__version__ == '$VERSION' else 1)" 2>/dev/null
}

if mmcv_ok; then
    echo "mmcv $VERSION with ops already installed"
    exit 0
fi
TORCH_TAG=$("$PY" -c "import torch; print(torch.__version__)")
VARIANT=$("$PY" -c "import os, torch; print('cuda' if os.environ.get('FORCE_CUDA') == '1' or torch.cuda.is_available() else 'cpu')")
CACHE="$CACHE_ROOT/torch-$TORCH_TAG-$VARIANT"
mkdir -p "$CACHE"

for WHEEL in "$CACHE"/mmcv-$VERSION-*.whl "$CACHE_ROOT"/mmcv-$VERSION-*.whl; do
    [ -f "$WHEEL" ] || continue
    echo "Installing cached $WHEEL"
    "$PIP" install -q --no-deps --force-reinstall "$WHEEL"
    if mmcv_ok; then
        "$PY" -c "import mmcv; print('mmcv', mmcv.__version__, 'with ops')"
        exit 0
    fi
    echo "cached wheel $WHEEL does not load with torch $TORCH_TAG; rebuilding" >&2
done

echo "Building mmcv $VERSION from source (10–20 minutes on 2 cores; cached afterwards)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PIP" install -q "setuptools<81" wheel ninja
"$PIP" download -q --no-deps --no-binary :all: --no-build-isolation -d "$WORK" "mmcv==$VERSION"
tar -xzf "$WORK"/mmcv-$VERSION.tar.gz -C "$WORK"
SRC="$WORK/mmcv-$VERSION"
sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
(cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA=${FORCE_CUDA:-0} MAX_JOBS=${MAX_JOBS:-2} \
    "$PIP" wheel --no-build-isolation --no-deps -w "$WORK/dist" .)
BUILT=$(ls "$WORK"/dist/mmcv-$VERSION-*.whl | head -n 1)
cp "$BUILT" "$CACHE/"
WHEEL="$CACHE/$(basename "$BUILT")"
echo "Installing $WHEEL"
"$PIP" install -q --no-deps --force-reinstall "$WHEEL"
"$PY" -c "from mmcv.ops import nms; import mmcv; print('mmcv', mmcv.__version__, 'with ops')"
