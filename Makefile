# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   -- creates .venv if missing, then runs the main job
#   make test   -- creates .venv if missing, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu bench-smoke clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) train.py

test: install
	$(PY) -m pytest -n auto --durations=15 $(PYTEST_ARGS)

# On a machine with a CUDA GPU: only the gpu-marked tests.
test-gpu: install
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# NA kernels vs FlexAttention-NA and SDPA; on a GPU drop --tiny (see docs/benchmarks.md).
bench-smoke: install
	$(PY) -m benchmarks.na_bench --tiny --cpu-threads 1

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

# The whole GPU record in one command (docs/benchmarks.md, "One-command GPU record"): with a CUDA
# GPU the record into RECORD_DIR within RECORD_BUDGET_S seconds; without one, the CPU smoke run.
RECORD_DIR ?= gpu-record
RECORD_BUDGET_S ?= 480
.PHONY: gpu-record
gpu-record: install
	if PYTHONPATH=. $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  PYTHONPATH=. $(PY) -m benchmarks.gpu_record --out $(RECORD_DIR) --budget-s $(RECORD_BUDGET_S); \
	else \
	  PYTHONPATH=. $(PY) -m benchmarks.gpu_record --smoke --out $(RECORD_DIR)-smoke; \
	fi

# Static audit of the Triton kernels for sm_90 without a GPU (docs/kernel_audit.md), on the installed
# Triton and the GPU image's Triton 3.6.0 (installed on demand into .audit/; or set
# AUDIT_TRITON36_PYTHON=/path/to/python that has triton==3.6.0).
AUDIT_TRITON36_PYTHON ?=
AUDIT_ARGS ?=
kernel-audit: install
	AUDIT_TRITON36_PYTHON=$(AUDIT_TRITON36_PYTHON) PYTHONPATH=. $(PY) -m benchmarks.kernel_audit --setup-side \
		--out-md kernel-audit.md --out-json kernel-audit.json $(AUDIT_ARGS)

kernel-audit-quick: install
	@AUDIT_TRITON36_PYTHON=$(AUDIT_TRITON36_PYTHON) PYTHONPATH=. $(PY) -m benchmarks.kernel_audit --setup-side --quick $(AUDIT_ARGS)

kernel-audit-setup: install
	AUDIT_TRITON36_PYTHON=$(AUDIT_TRITON36_PYTHON) PYTHONPATH=. $(PY) -m benchmarks.kernel_audit --setup-side --triton 3.6.0 --check-setup

.PHONY: kernel-audit kernel-audit-quick kernel-audit-setup
