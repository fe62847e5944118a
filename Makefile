# Every target creates .venv in the repo root when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two stamps: the demo needs the exporter and the runtime only (the `demo` extra: no Ray, no
# test tools); the tests need everything (`dev`, which includes `demo`). Either order works.
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed

.PHONY: demo serve test test-all venv clean

venv: $(STAMP)

$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[demo]"
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP) $(DEMO_STAMP)

# The main job: export the bundled checkpoint (weights/tiny) to ONNX, restore a JPEG (QF 10) of
# scikit-image's astronaut photo with the torch-free runtime, write out/demo/.
demo: $(DEMO_STAMP)
	$(PY) -m demo --out out/demo

# The bundled model behind sodiff-serve's before/after page at http://127.0.0.1:8000/ (Ctrl-C
# stops it); adds the `ray` extra to the demo's install when it is missing.
serve: $(DEMO_STAMP)
	$(PY) -c "import ray.serve, prometheus_client" 2>/dev/null || $(PY) -m pip install -q -e ".[demo,ray]"
	$(PY) -m demo --serve

# Two pytest-xdist workers, a test file each at a time (`loadfile`: a module's shared fixtures,
# such as its Ray cluster or exported engine, stay in one process): 352 s -> 240 s on 2 cores.
# `make test WORKERS=0` runs in one process.
WORKERS ?= 2
XDIST = $(if $(filter 0,$(WORKERS)),-p no:xdist,-n $(WORKERS) --dist loadfile)

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow and not gpu"

test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info out/demo engines/tiny
