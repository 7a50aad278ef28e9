# Two commands:  `make demo`  and  `make test`.
# The virtual environment ($(VENV), default .venv) is filled in layers, each on first use and stamped:
#   core  (`make core`)  torch, torchvision, timm, open_clip, matplotlib, scikit-learn, ...: wheels only,
#                        nothing compiled; enough for the demo, classification and CLIP.
#   det   (`make det`)   detection: mmengine, pycocotools, mmcv 2.1.0 compiled from source once
#                        (10-50 minutes on 2 cores, wheel cached in ~/.cache/qwt-toolkit), mmdet 3.3.0.
#   yolo  (`make yolo`)  Ultralytics (AGPL-3.0) + the original YOLOv5 model code (yolov5 7.0.14, no deps).
#   test                 pytest, ruff.
# `make demo` installs only core; `make test` installs all layers (so it builds mmcv the first time).
# VENV=/some/dir selects another environment, e.g. `make demo VENV=/tmp/venv_core`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CORE   := $(VENV)/.core-installed
DET    := $(VENV)/.det-installed
YOLO   := $(VENV)/.yolo-installed
TESTS  := $(VENV)/.test-installed
# what the bench targets need
STAMP  := $(CORE)

.PHONY: venv core det yolo demo test lint bench bench-onnx bench-speed clean-venv

core: $(CORE)
det: $(DET)
yolo: $(YOLO)
# every layer (what `make test` needs)
venv: $(CORE) $(DET) $(YOLO) $(TESTS)
	touch $(VENV)/.installed

$(CORE): requirements.txt pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(PYTHON) $(VENV) core
	touch $@

$(DET): $(CORE) requirements-det.txt scripts/build_mmcv.sh
	bash scripts/setup_env.sh $(PYTHON) $(VENV) det
	touch $@

$(YOLO): $(CORE) requirements-yolo.txt
	bash scripts/setup_env.sh $(PYTHON) $(VENV) yolo
	touch $@

$(TESTS): $(CORE) requirements-test.txt
	bash scripts/setup_env.sh $(PYTHON) $(VENV) test
	touch $@

# FP / RepQ-ViT / + QwT on scikit-learn digits, 3 seeds -> outputs/demo/demo_results.json + demo.png
demo: $(CORE)
	$(PY) scripts/demo.py $(DEMO_ARGS)

test: $(CORE) $(DET) $(YOLO) $(TESTS)
	$(PY) -m pytest -q tests

# ruff (pyproject.toml: pyflakes + pycodestyle errors); .ci/run runs it before the tests
lint: $(TESTS)
	$(PY) -m ruff check .

# calibration / fake-quant eval / QwT time vs FP, DeiT-S, Swin-T, ResNet-50 (2 CPU threads; + GPU if any)
# -> results/speed_<devices>.json
bench: bench-speed
bench-speed: $(STAMP)
	$(PY) -m benchmarks.speed $(SPEED_ARGS)

# ONNX QDQ int8 latency (onnxruntime, 2 threads): DeiT-S, Swin-T, ResNet-50 -> results/onnx_latency.json
bench-onnx: $(STAMP)
	$(PY) -m benchmarks.onnx_latency

clean-venv:
	rm -rf $(VENV)
