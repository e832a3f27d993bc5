# Two commands on a fresh clone: `make demo` (data -> train -> eval -> HTML report -> search index) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.installed-dev-stamp
DEMO_DATA := data/shapes
DEMO_RUN := runs/demo

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[search,serve]'
	touch $(STAMP)

# Tests and benchmarks also need the interop/caption extras (transformers, open_clip, pycocoevalcap).
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

install: $(DEV_STAMP)

$(DEMO_DATA)/info.json: | $(STAMP)
	$(BIN)/vlp data shapes --out $(DEMO_DATA) --train 40000

demo: $(STAMP) $(DEMO_DATA)/info.json
	$(BIN)/vlp train clip --data $(DEMO_DATA) --out $(DEMO_RUN) $(if $(wildcard $(DEMO_RUN)/checkpoints/latest),--resume,--overwrite)
	$(BIN)/vlp eval $(DEMO_RUN) --data $(DEMO_DATA)
	$(BIN)/vlp index build $(DEMO_RUN) $(DEMO_DATA)/test --out $(DEMO_RUN)/index
	@echo "open $(DEMO_RUN)/report.html"
	@echo "serve it: $(BIN)/vlp serve $(DEMO_RUN)/index   (then open http://127.0.0.1:8000)"

test: $(DEV_STAMP)
	$(BIN)/python -m pytest

test-slow: $(DEV_STAMP)
	$(BIN)/python -m pytest -m slow

# ruff's settings are in pyproject.toml; `ruff format` (without --check) fixes the layout.
lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench experiments
	$(BIN)/ruff format --check src tests bench experiments

bench: $(DEV_STAMP)
	$(BIN)/python bench/clip_tiny.py --precision fp32
	$(BIN)/python bench/clip_tiny.py --precision bf16
	$(BIN)/python bench/clip_tiny.py --size small
	$(BIN)/python bench/mfu.py
	$(BIN)/python bench/blip_tiny.py --precision fp32
	$(BIN)/python bench/blip_hf.py
	$(BIN)/python bench/qformer_hf.py
	$(BIN)/python bench/coca_tiny.py --precision fp32
	$(BIN)/python bench/generation_hf.py
	$(BIN)/python bench/retrieval_scale.py

clean:
	rm -rf $(VENV) data runs .pytest_cache
