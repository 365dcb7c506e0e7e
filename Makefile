# fastbert: `make bench` (install + the main job) and `make test` (install + the test suite) each work on a
# fresh machine. torch is installed only when absent (pinned to the CPU wheel this project's machines carry);
# the C++ extension builds against the installed torch (--no-build-isolation).
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: torch install install-test bench test lint clean

torch:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==2.13.0"

install: torch
	$(PIP) setuptools wheel ninja
	$(PIP) --no-build-isolation -e ".[text]"

install-test: torch
	$(PIP) setuptools wheel ninja
	$(PIP) --no-build-isolation -e ".[text,test]"

bench: install
	$(PY) -m fastbert.cli bench

test: install-test lint
	FASTBERT_REQUIRE_CPP=1 $(PY) -m pytest tests -q -ra
	FASTBERT_BENCH_TINY=1 $(PY) -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider

lint:
	$(PY) -m ruff check fastbert kernels tests benchmarks setup.py
	$(PY) -m ruff format --check fastbert kernels tests benchmarks setup.py

clean:
	rm -rf build dist *.egg-info fastbert/_C*.so
