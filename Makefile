# Set-up is from nothing: a virtual environment in .venv with torch pinned to the
# CPU-friendly 2.13.0 (an unpinned torch pulls several GB of CUDA packages).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.xtalsym-installed
TORCH  := torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: setup demo test bench clean promtool

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[ml,distributed,daemon,test]'
	touch $(STAMP)

# Main job on the shipped defaults: the live path on loopback — detector-sim streams the
# shipped structures as a detector would, `xtalsym serve` classifies them with the shipped
# bundle (reference_index/), a listener prints each prediction against the truth and a
# summary; before that, the offline part: simulate + shape them into a dataset and save
# a grid of raw and shaped DPs.
demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/xtalsym simulate dataset --structures xtalsym/data/structures --out $(DEMO_OUT)/dataset --workers 2 --no-progress
	$(BIN)/xtalsym dataset show $(DEMO_OUT)/dataset --out $(DEMO_OUT)/examples.png
	$(BIN)/xtalsym demo

test: setup
	$(BIN)/python -m pytest -n 2 -q

# promtool (Debian's prometheus package, unpacked into .tools/): tests/daemon/test_metrics.py runs
# `promtool check metrics` with it when XTALSYM_PROMTOOL points to it (.ci/run does that).
promtool:
	@path=$$(.ci/fetch-promtool); if [ -n "$$path" ]; then echo "export XTALSYM_PROMTOOL=$$path"; fi

bench: setup
	$(BIN)/python benchmarks/simulate.py
	$(BIN)/python benchmarks/shaping.py
	$(BIN)/python benchmarks/dataset.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis .tools
