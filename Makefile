# Two commands do all the set-up on a fresh machine:
#   make demo   train 2 ranks on scikit-learn's digits with local Spark and an embedded MLflow store
#   make test   the whole test suite (builds Horovod and the executors' environment once into
#               ~/.cache/sparkml_dist if missing)
# For clusters: make dist   the wheel and the packed executors' environment in dist/
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN)/python)
export SPARK_LOCAL_IP ?= 127.0.0.1

.PHONY: venv demo test test-fast horovod dist dist-horovod ui bench lock clean

venv: $(STAMP)
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, alone: 2.13.0 resolves to the local CPU wheel.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

data/digits.parquet: | $(STAMP)
	$(BIN)/python -m sparkml_dist.datasets $@

demo: $(STAMP) data/digits.parquet
	$(BIN)/spark-submit --master "local[2]" --conf spark.log.level=WARN --conf spark.ui.showConsoleProgress=false \
	  jobs/train.py --config conf/digits.yaml $(ARGS)

horovod: $(STAMP)
	scripts/build_horovod.sh $(BIN)/python

# The wheel and dist/sparkml_dist-env.tar.gz (venv-pack), cached by requirements.lock and the code.
dist: $(STAMP)
	$(BIN)/python scripts/pack_env.py

# The same with the Horovod wheel inside, for backend.name=horovod on a cluster.
dist-horovod: $(STAMP) horovod
	$(BIN)/python scripts/pack_env.py --horovod

# Two pytest workers, each test module whole on one of them (its Spark session and module
# fixtures stay shared): about half the serial wall time on 2 cores. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(STAMP) horovod dist
	$(BIN)/python -m pytest -ra -q -n $(TEST_WORKERS) --dist loadfile --durations=20 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -q -m "not cluster and not horovod" $(PYTEST_ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000 --workers 1

bench: $(STAMP) horovod
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//' > requirements.lock.new && echo "review requirements.lock.new"

clean:
	rm -rf $(VENV) data mlflow.db mlruns spark-warehouse dist build
