# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv at the repo root on first use and install the package editable.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ueo-installed
FASHION := /usr/share/datasets/fashion-mnist
WORDNET := /usr/share/wordnet/index.noun

.PHONY: demo test lint fashion-mnist wordnet clean wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/pip install --quiet --no-deps animal-mnist
	touch $(STAMP)

fashion-mnist:
	@if [ ! -d $(FASHION) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing the Debian package dataset-fashion-mnist (offline testbed data)"; \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist" \
	         "(sudo apt-get install dataset-fashion-mnist) or set UEO_FASHION_MNIST to its folder." >&2; \
	  fi; \
	fi

# WordNet's nouns: the default vocabulary of `ueo discover` (neither the demo nor the tests need it).
wordnet:
	@if [ ! -f $(WORDNET) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing the Debian package wordnet-base (ueo discover's default vocabulary)"; \
	    apt-get update -qq && apt-get install -y -qq wordnet-base >/dev/null; \
	  else \
	    echo "WordNet is missing: install the Debian package wordnet-base" \
	         "(sudo apt-get install wordnet-base) or give ueo discover --vocabulary FILE." >&2; \
	  fi; \
	fi

demo: $(STAMP) fashion-mnist
	HF_HUB_OFFLINE=1 $(BIN)/ueo demo --out runs/demo

test: $(STAMP) fashion-mnist
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs

# Wheels the GPU benchmark carries to a machine without package registries (benchmarks/gpu.sh).
wheels: $(STAMP)
	$(BIN)/pip download --quiet --no-deps --dest .wheels "open_clip_torch==3.3.0" ftfy wcwidth
