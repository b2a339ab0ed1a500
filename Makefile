# The two commands of the README:
#   make demo   set up from nothing, then train the whole system on the embedded default and report
#   make test   set up from nothing, then run the test suite
PYTHON ?= python3
VENV ?= .venv
# torch from this machine's disk; override on other machines, e.g. TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# DeepSpeed compiles its CPU ops here on first use (2-5 min each); outside the clone, so a fresh
# clone (CI) reuses them. Override: make test TORCH_EXTENSIONS_DIR=/path.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/dualtoken/torch_extensions
export DS_ACCELERATOR ?= cpu
BIN := $(VENV)/bin
# A dropped connection to the registry (seen in CI: a CUDA wheel cut off at 42 of 46 MB) is retried
# inside pip, then the whole install is tried again; what already installed is not fetched twice.
PIP = $(BIN)/pip install --quiet --retries 10 --resume-retries 10

.PHONY: setup browser demo test test-all bench lint clean-runs

setup: $(VENV)/.installed browser

# The web page test drives a headless Chromium; on a fresh Debian/Ubuntu machine run as root,
# install it (and its driver) with apt-get; elsewhere the test is skipped and says why.
browser:
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
		|| echo "note: no chromium/chromedriver (not root, or no apt-get): the web page test will be skipped"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --retries 10 --upgrade pip || $(BIN)/pip install --quiet --retries 10 --upgrade pip
	$(PIP) $(TORCH_SPEC) || $(PIP) $(TORCH_SPEC) || $(PIP) $(TORCH_SPEC)
	$(PIP) -e ".[dev]" || $(PIP) -e ".[dev]" || $(PIP) -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/dualtoken tiny-pipeline

test: setup
	$(BIN)/python -m pytest -m "not benchmark" -q

bench: setup
	$(BIN)/python -m pytest tests/benchmarks -m benchmark -q -s

lint: setup
	$(BIN)/ruff check tokenizer mllm training eval tests

clean-runs:
	rm -rf runs
