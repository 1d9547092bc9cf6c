# Two commands set everything up on a fresh Debian/Ubuntu machine:
#   make demo   – segment the bundled real nuScenes sample with the default model
#   make test   – run the whole test suite (needs `make ros` first, which it runs itself)
#   make ros    – add ROS 2 Kilted (pinned PyPI wheels, requirements-ros.txt) to .venv and
#                 build the interface packages of ros_interfaces/ into it (needs cmake, g++,
#                 python3-dev; `make demo` does not need any of this)
# All create the virtual environment .venv with pinned versions first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo

.PHONY: venv ros demo test bench clean

$(VENV)/.stamp: requirements.txt requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.stamp

# ROS 2 layer. The wheels install into the venv prefix (lib/, share/) and ship a .pth
# (ros_wheels_bootstrapper) that re-executes the venv's python once with LD_LIBRARY_PATH set,
# so .venv/bin/python and the console scripts in .venv/bin need nothing sourced; build.sh
# installs tf2_msgs and vision_msgs into the same prefix.
ROS_INTERFACE_FILES := ros_interfaces/build.sh $(wildcard ros_interfaces/*/package.xml \
	ros_interfaces/*/CMakeLists.txt ros_interfaces/*/msg/*.msg)

$(VENV)/.ros-stamp: requirements-ros.txt $(ROS_INTERFACE_FILES) | $(VENV)/.stamp
	@command -v cmake >/dev/null && command -v gcc >/dev/null && command -v g++ >/dev/null \
	  && $(PY) -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || { echo "make ros needs cmake, g++ and the Python headers (Python.h): sudo apt-get install cmake g++ python3-dev" >&2; exit 1; }
	$(PY) -m pip install --quiet --require-hashes -r requirements-ros.txt
	bash ros_interfaces/build.sh $(VENV)
	touch $@

ros: $(VENV)/.ros-stamp

demo: venv
	$(PY) -m training.demo --out $(OUT) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

# CLIP2SCENE_REQUIRE_ROS=1: a missing rclpy fails the ROS tests instead of skipping them.
# ruff first (rules in ruff.toml): a lint error fails the run before the long suite starts.
test: venv ros
	$(VENV)/bin/ruff check .
	CLIP2SCENE_REQUIRE_ROS=1 $(PY) -m pytest -q test

# Benchmarks (figures only; README "Benchmarks"). The optional peer spconv (CPU build, pinned
# with hashes in requirements-bench.txt, --no-deps: see its header) is added to the venv for
# the backbone comparison; the benchmarks still run, saying so, where it cannot be imported.
# BENCH_ARGS=--quick: fewer repetitions (and one scan for the backbone comparison).
BENCH_ARGS ?=

# (no wheel for this platform / Python: said once per run, and the benchmarks go on without it)
$(VENV)/.bench-stamp: requirements-bench.txt | $(VENV)/.stamp
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements-bench.txt && touch $@ \
	  || echo "spconv could not be installed: benchmarks run without the spconv comparison" >&2

bench: venv $(VENV)/.bench-stamp
	$(PY) benchmarks/pipeline_latency.py --threads 1 $(BENCH_ARGS)
	$(PY) benchmarks/backbone_throughput.py --threads 1 $(BENCH_ARGS)
	$(PY) benchmarks/teacher_latency.py

clean:
	rm -rf $(VENV) out runs
