# The README's two commands: `make demo` (train + evaluate on the bundled data, 2 local ranks)
# and `make test`. Both build the virtualenv first when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ami-dist-installed
# JIT-built ops (DeepSpeed's shared-memory collective) live inside the venv, not in ~/.cache, so that
# a clone never waits on another clone's build lock or loads a build made against another torch.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
CSRC := $(wildcard csrc/*)

.PHONY: demo test lint setup clean

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt -c constraints.txt
	$(PIP) install --quiet --no-build-isolation deepspeed==0.19.8 -c constraints.txt
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	@# DeepSpeed JIT-compiles its shared-memory collective op on first use (about a minute);
	@# do it once here rather than inside the first training run or test. A build that hangs fails
	@# here after ten minutes rather than stalling every run after it.
	timeout 600 $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus 2 ami_dist/train.py \
		--deepspeed_config configs/ds_zero2.json --config configs/nmt_demo.yaml

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
