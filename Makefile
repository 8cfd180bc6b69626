# Set-up is from nothing: a virtual environment in .venv with torch pinned to the
# CPU-friendly 2.13.0 (an unpinned torch pulls several GB of CUDA packages).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.xtalsym-installed
TORCH  := torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: setup demo test lint format bench clean promtool

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

# ruff (configured in pyproject.toml): lint everything; the formatter's check covers the
# folders already formatted (the rest is formatted in one commit once parallel work has
# landed, so that no branch has to merge a whole-tree reformat).
FORMATTED := xtalsym/cli/__init__.py xtalsym/cli/data.py xtalsym/cli/index.py xtalsym/cli/model.py \
             xtalsym/cli/train.py xtalsym/index xtalsym/testing.py xtalsym/progress.py xtalsym/offline/samples.py \
             xtalsym/offline/images.py xtalsym/daemon/endpoints.py xtalsym/daemon/client.py \
             xtalsym/daemon/overload.py xtalsym/daemon/series_files.py \
             tests/daemon/conftest.py tests/cli/test_user_errors.py tests/test_install.py \
             xtalsym/dataset_format.py xtalsym/offline/dataset.py xtalsym/offline/embed.py \
             xtalsym/inference/quantise.py xtalsym/cli/options.py xtalsym/daemon/publish.py \
             tests/test_layers.py tests/index/test_index.py tests/daemon/test_daemon_e2e.py \
             tests/daemon/test_combine_aside.py tests/daemon/test_classify_recorded.py \
             tests/daemon/test_daemon_field_behaviours.py tests/daemon/test_robustness_daemon.py \
             benchmarks/daemon.py benchmarks/soak.py

lint: setup
	$(BIN)/ruff check xtalsym tests benchmarks
	$(BIN)/ruff format --check $(FORMATTED)

format: setup
	$(BIN)/ruff format $(FORMATTED)
	$(BIN)/ruff check --fix xtalsym tests benchmarks

# promtool (Debian's prometheus package, unpacked into .tools/): tests/daemon/test_metrics.py runs
# `promtool check metrics` with it when XTALSYM_PROMTOOL points to it (.ci/run does that).
promtool:
	@path=$$(.ci/fetch-promtool); if [ -n "$$path" ]; then echo "export XTALSYM_PROMTOOL=$$path"; fi

# Every benchmark in benchmarks/, each with settings that finish in minutes on a small
# CPU machine (the documented full runs are in each script's docstring and docs/RESULTS.md).
# The two that need a dataset use BENCH_DATASET, built once from random crystals of eight
# space groups when it does not exist (pass BENCH_DATASET=data/mp for the real figures).
BENCH_OUT     ?= bench_out
BENCH_DATASET ?= $(BENCH_OUT)/dataset
BENCH_GROUPS  := 2,14,15,62,139,194,221,225

$(BENCH_DATASET):
	$(BIN)/xtalsym simulate dataset --random-space-groups $(BENCH_GROUPS) --random-per-group 12 \
	    --structures xtalsym/data/structures --out $(BENCH_DATASET) --workers 2 --no-progress

bench: setup $(BENCH_DATASET)
	$(BIN)/python benchmarks/simulate.py
	$(BIN)/python benchmarks/shaping.py
	$(BIN)/python benchmarks/dataset.py --limit 64 --workers 2
	$(BIN)/python benchmarks/index.py --sizes 10000 --seconds 0.5
	$(BIN)/python benchmarks/index_quantisation.py --dataset $(BENCH_DATASET) --samples 96 --every 4 --pq-m 96
	$(BIN)/python benchmarks/inference.py --seconds 1
	$(BIN)/python benchmarks/daemon.py --images 48
	$(BIN)/python benchmarks/soak.py --duration 30 --overload-seconds 10 --sample-seconds 10 --out $(BENCH_OUT)/soak.json
	$(BIN)/python benchmarks/paper_comparison.py --dataset $(BENCH_DATASET) --groups 8 --epochs 1 --input-size 32 \
	    --num-workers 0 --out $(BENCH_OUT)/paper_comparison

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(BENCH_OUT) .pytest_cache .hypothesis .tools .ruff_cache
