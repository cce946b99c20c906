# Set-up is part of every target: the first call builds .venv (torch from this machine's disk,
# the TensorFlow/ONNX extras, pytest), later calls reuse it.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The venv holds several GB (torch's CUDA build, TensorFlow); pip's cache would hold the wheels a
# second time, and CI machines can be short of disk.
export PIP_NO_CACHE_DIR ?= 1

.PHONY: run test test-fast bench-distill

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[all,dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/edgekd run --resume

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

bench-distill: $(STAMP)
	$(VENV)/bin/python benchmarks/distill_cifar10.py
