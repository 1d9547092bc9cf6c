# Two commands set everything up on a fresh Debian/Ubuntu machine:
#   make demo   – segment the bundled real nuScenes sample with the default model
#   make test   – run the whole test suite
# Both create the virtual environment .venv with pinned versions first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo

.PHONY: venv demo test bench clean

$(VENV)/.stamp: requirements.txt requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.stamp

demo: venv
	$(PY) -m clip2scene_ros.demo --out $(OUT) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

test: venv
	$(PY) -m pytest -q test

bench: venv
	$(PY) benchmarks/backbone_throughput.py

clean:
	rm -rf $(VENV) out runs
