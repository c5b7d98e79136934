# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Which faiss wheel to install: cpu (faiss-cpu) or gpu (faiss-gpu, CUDA 12). Both write the module `faiss`, so
# installing one first removes the other; the stamp names the choice, so switching reinstalls. Once chosen, gpu
# stays the default (a later `make test` keeps faiss-gpu) until FAISS=cpu is given.
FAISS ?= $(if $(wildcard $(VENV)/.installed-faiss-gpu),gpu,cpu)
STAMP := $(VENV)/.installed-faiss-$(FAISS)

.PHONY: install demo test test-fast bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	rm -f $(VENV)/.installed-faiss-*
	$(PY) -m pip uninstall --quiet --yes faiss-cpu faiss-gpu faiss-gpu-cu12 faiss-gpu-cu11
	$(PY) -m pip install --quiet -e '.[$(FAISS),test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/mokd-eval demo

test: install
	$(PY) -m pytest -q

# The edit-test loop: everything but what trains, runs a command end to end or spawns processes (under a minute).
# Two pytest-xdist workers of one torch thread each: with torch's default threads the two workers oversubscribe
# a 2-core machine (measured 114 s against 59 s, loaded); none of these tests spawns a process or opens a port.
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow and not cuda and not detectron2"

bench: install
	$(PY) benchmarks/bench_knn.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_linear.py
	$(PY) benchmarks/bench_analysis.py
	$(PY) benchmarks/bench_detection.py

# The CUDA tests, then the GPU benchmarks into gpu-check.json (docs/gpu.md). Where torch sees no GPU: one line and
# exit 2, before faiss-cpu is swapped for faiss-gpu.
gpu-check: install
	@$(PY) benchmarks/gpu_check.py --preflight
	$(MAKE) install FAISS=gpu
	$(PY) benchmarks/gpu_check.py --json gpu-check.json

clean:
	rm -rf demo-output results .pytest_cache gpu-check.json
