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

.PHONY: demo test lint setup clean gpu-check gpu-wheels

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

# The GPU check (benchmarks/gpu_check.py): on a machine with one NVIDIA GPU, with that machine's own python3
# and CUDA PyTorch (no venv, no registry: gpu_wheels/ brings DeepSpeed); DRY=1 runs it on CPU in the venv.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?=
gpu-check: $(if $(filter 1,$(DRY)),$(STAMP))
	$(if $(filter 1,$(DRY)),$(PY),$(GPU_PYTHON)) benchmarks/gpu_check.py $(if $(filter 1,$(DRY)),--dry) \
		$(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT))

# What the GPU machine lacks, as wheels for its Python 3.12: DeepSpeed (pure Python) and its needs not
# installed there, at the versions of constraints.txt.
GPU_WHEEL_NEEDS := hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
gpu-wheels: $(STAMP)
	rm -rf gpu_wheels && mkdir -p gpu_wheels
	$(PIP) wheel --quiet --no-deps --no-build-isolation -w gpu_wheels deepspeed==0.19.8
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d gpu_wheels $(foreach p,$(GPU_WHEEL_NEEDS),$(shell grep -i -E '^$(subst _,[-_],$(p))==' constraints.txt))
	du -sh gpu_wheels

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
