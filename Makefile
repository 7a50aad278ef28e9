# Two-command setup:  `make demo`  and  `make test`.
# The virtual environment (.venv) is created and filled on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt setup.py scripts/setup_env.sh scripts/build_mmcv.sh
	bash scripts/setup_env.sh $(PYTHON) $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/calibration_cost.py

clean-venv:
	rm -rf $(VENV)
