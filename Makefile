VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.gard-setup-done

$(VENV)/.gard-setup-done: pyproject.toml tools/setup_env.sh tools/torchvision_cpu_fix.py
	rm -f $@
	VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(VENV)/bin/gard train configs/demo.yaml --output-dir runs/demo --resume never

test: setup
	$(PY) -m pytest -q -x

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/run_demo_benchmarks.py

clean:
	rm -rf runs .cache
