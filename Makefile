# Two entry points for a fresh machine:
#   make demo   label the bundled sample images on an embedded local Ray
#   make test   create .venv if needed, install, lint, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch and torchvision first, pinned, so that the resolver never pulls another build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check cass_engine pipeline jobs schemas tests bench

test: lint
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(PY) jobs/label.py --vocab samples/vocab.txt --input samples/images --output out/demo --random-weights 0 --actors 1 --confidence

bench: $(STAMP)
	$(PY) bench/engine_bench.py --preset coco_stuff --random-weights 0

clean:
	rm -rf out .pytest_cache
