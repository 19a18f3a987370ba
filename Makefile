# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the CPU test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default, so pip does not pull a multi-GB CUDA build; on a GPU machine use
# e.g. `make demo TORCH_SPEC="torch>=2.11"` or a venv made with --system-site-packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m djinn.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) OSDI_Evaluation/micro/bench_core.py

clean:
	rm -rf $(VENV)
