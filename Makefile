# `make test` and `make bench` do all the set-up themselves (scripts/install.sh) on first use.
PY ?= python3
SOURCES := setup.py pyproject.toml scripts/install.sh $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null)

.PHONY: install test bench
install: .install-stamp
.install-stamp: $(SOURCES)
	PYTHON=$(PY) bash scripts/install.sh
	touch $@

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks
