# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/mokd-eval demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_knn.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_linear.py
	$(PY) benchmarks/bench_analysis.py
	$(PY) benchmarks/bench_detection.py

clean:
	rm -rf demo-output results .pytest_cache
