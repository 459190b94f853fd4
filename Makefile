# drray: the two set-up commands are `make demo` and `make test`; both install first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo table1 bench lint clean

install: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml (they install from local files
# on our machines); the stamp makes repeated `make test` skip the install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Two test processes (pytest-xdist), each module in one of them (its fixtures made once): the
# Ray tests spend much of their time waiting (Ray's start-up, its schedulers), so two overlap
# much of that wait on 2 cores. The SLURM tests then run alone: their jobs must finish work
# between SLURM's time-limit signals (a 2-minute limit), which a second test process's load
# made them miss. `$(BIN)/pytest tests/x.py` runs one file in one process.
test: install
	$(BIN)/pytest -n 2 --dist loadscope --no-loadscope-reorder -m "not slurm"
	$(BIN)/pytest -m slurm

demo: install
	$(BIN)/drray run pipeline --config configs/demo.yaml

# Table 1 on the demo's synthetic benchmark over 3 label draws (demo.yaml's table1.seeds): one
# pretraining, then per draw the method, FixMatch, MixMatch and the supervised baseline on 100%
# of the labels (on 2 cores after `make demo`: the first draw ~45 min, draws 1 and 2 another
# 64 min, measured 2026-12-02); the table over the draws goes into runs/demo/table1.md and
# runs/demo/report.md.
table1: install
	$(BIN)/drray run table1 --config configs/demo.yaml

bench: install
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/fit_overhead.py
	$(BIN)/python bench/pseudolabel.py
	$(BIN)/python bench/inference_memory.py
	$(BIN)/python bench/augment.py
	$(BIN)/python bench/synth_colour.py
	$(BIN)/python bench/demo.py
	$(BIN)/python bench/sweep.py
	@if command -v slurmctld >/dev/null; then $(BIN)/python bench/slurm_submit.py; \
	else echo "bench/slurm_submit.py skipped: apt-get install slurm-wlm munge to run it"; fi

lint: install
	$(BIN)/ruff check drray jobs tests bench

clean:
	rm -rf runs data/ci bench/out .pytest_cache
