# Two commands: `make demo` (the example in examples/digits_demo) and `make test`. Both bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PEER := .venv-peer

.PHONY: demo test check-serve lint typecheck-tree bench bench-peer venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel kept on these machines; any torch range that admits a newer release pulls CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# LitData declares torchvision, which it does not need here and whose only wheel for this torch breaks the
	# import of torchmetrics (and so Lightning): install the one dependency it imports first, then LitData without
	# its declared ones (a --no-deps install skips pip's conflict check, which would otherwise name torchvision).
	$(BIN)/pip install --quiet 'boto3>=1.28'
	$(BIN)/pip install --quiet --no-deps litdata==0.2.76
	touch $(STAMP)

# The demo rebuilds demo-work/ from scratch: it refuses a checkout where the DVC pipeline's data owner published there.
demo: $(STAMP)
	@test ! -e demo-work/data.dvc || { echo "make demo: demo-work/ holds the DVC pipeline's data and keys" \
		"(demo-work/data.dvc), which the demo would wipe: run it in another checkout" >&2; exit 2; }
	PYTHONPATH=examples $(BIN)/python -m digits_demo demo

test: $(STAMP)
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

# Opt-in (minutes, needs the package index): a cycle's champion served by `mlflow models serve --env-manager
# virtualenv` from an environment built from the model's own requirements (MLflow needs pyenv for it).
check-serve: $(STAMP)
	$(BIN)/python -m pytest -m serve -p no:cacheprovider -rP tests/pipeline/test_model_serving.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck-tree
	$(BIN)/mypy

# mypy cannot follow pyproject's package-dir (provenance/ installs as trainguard.provenance): it reads setuptools'
# strict editable link tree, trainguard/ as a wheel lays it out, one link per file back to the sources. Built anew on
# each lint so new modules are seen; not installed (.venv's editable install resolves modules by name, so
# `python -m pytest` still finds trainguard.provenance with the repository's own trainguard/ first on sys.path).
typecheck-tree: $(STAMP)
	rm -rf build/__editable__.trainguard-* build/editable build/typecheck
	mkdir -p build/editable
	$(BIN)/python -c 'from setuptools import setup; setup()' --quiet editable_wheel --mode strict \
		--dist-dir build/editable >build/editable.log 2>&1 || { cat build/editable.log; exit 1; }
	ln -s $$(cd build && echo __editable__.trainguard-*) build/typecheck

# The peer AutoAttack (torchattacks) of benchmarks/adversarial.py, in its own virtualenv: it pins requests 2.25,
# which breaks mlflow in .venv.
bench-peer: $(PEER)/.installed

$(PEER)/.installed: benchmarks/peer/requirements.txt
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install --quiet -r benchmarks/peer/requirements.txt
	touch $@

bench: $(STAMP) $(PEER)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	for b in benchmarks/*.py; do PYTHONPATH=examples $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(PEER) mlflow.db mlruns demo-work .pytest_cache .mypy_cache build
