# The README's two commands: `make demo` (train + evaluate on the bundled data, 2 local ranks)
# and `make test`. Both build the virtualenv first when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ami-dist-installed
# Any op DeepSpeed JIT-builds lives inside the venv, not in ~/.cache, so that a clone never waits on
# another clone's build lock or loads a build made against another torch. (ami-dist builds none: the
# shared-memory collective DeepSpeed would build on CPU serves only its inference path; see
# ami_dist/distributed/comm.py.)
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
