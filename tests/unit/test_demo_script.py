"""scripts/demo.py's choices made before anything starts: its folder, its pace, a folder in use.

The demo run itself (servers, rotator, Ctrl-C) is tests/e2e/test_demo.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest

from rotator import config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("ROTATOR_DEMO_DIR", "ROTATOR_DEMO_PORTS", "ROTATOR_DEMO_PACE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.timeout(10)
def test_the_default_demo_keeps_its_files_in_dot_demo(
    demo: ModuleType, environ: pytest.MonkeyPatch
) -> None:
    assert demo.settings() == (ROOT / ".demo", (5055, 8255, 9109), "demo")


@pytest.mark.timeout(10)
def test_a_demo_on_other_ports_keeps_its_files_apart_from_the_default_one(
    demo: ModuleType, environ: pytest.MonkeyPatch
) -> None:
    # following the port-taken hint must not overwrite the running demo's key and token
    environ.setenv("ROTATOR_DEMO_PORTS", "5155,8355,9209")

    folder, ports, _ = demo.settings()

    assert (folder, ports) == (ROOT / ".demo-5155", (5155, 8355, 9209))
    environ.setenv("ROTATOR_DEMO_DIR", str(ROOT / "elsewhere"))
    assert demo.settings()[0] == ROOT / "elsewhere"


@pytest.mark.timeout(10)
def test_the_drill_pace_runs_a_copy_at_a_human_pace_and_leaves_the_demo_config_alone(
    demo: ModuleType, tmp_path: Path
) -> None:
    before = (ROOT / "config" / "demo.yaml").read_text()

    path = demo.demo_config(tmp_path, demo.PORTS, "drill")

    assert path == tmp_path / "demo.yaml"
    timing = config.load(path).targets[0].timing
    assert timing.max_age == timedelta(minutes=30)
    assert timing.grace == timing.inactive_period == timedelta(minutes=5)
    assert timing.check_interval == timedelta(seconds=10)
    assert timing.verify_timeout == timedelta(seconds=20)  # the demo's, unchanged
    assert (ROOT / "config" / "demo.yaml").read_text() == before


@pytest.mark.timeout(10)
def test_an_unknown_pace_is_refused_naming_the_paces(
    demo: ModuleType, environ: pytest.MonkeyPatch
) -> None:
    environ.setenv("ROTATOR_DEMO_PACE", "slow")

    with pytest.raises(SystemExit, match=r"ROTATOR_DEMO_PACE='slow': give one of demo, drill"):
        demo.settings()


@pytest.fixture
def other_demo() -> Iterator[int]:
    """A process whose command line names demo.py, as a running demo's does; ended by its PID."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()", "demo.py"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"up\n"  # its command line is demo.py's from now on
        yield process.pid
    finally:
        process.kill()
        process.communicate(timeout=10)  # closes its stdin pipe too


@pytest.mark.timeout(20)
def test_a_folder_a_running_demo_uses_is_refused_before_anything_starts(
    demo: ModuleType, environ: pytest.MonkeyPatch, tmp_path: Path, other_demo: int
) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "demo.pid").write_text(f"{other_demo}\n")
    (folder / "eim-credentials").write_text("the running demo's key")
    environ.setenv("ROTATOR_DEMO_DIR", str(folder))

    assert demo.running_demo(folder) == other_demo
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        env={"PATH": "/usr/bin:/bin", "ROTATOR_DEMO_DIR": str(folder)},
        capture_output=True,
        text=True,
        timeout=15,
    )

    assert done.returncode == 1
    assert f"the demo running as PID {other_demo}" in done.stderr
    assert "ROTATOR_DEMO_DIR" in done.stderr and "Traceback" not in done.stderr
    assert (folder / "eim-credentials").read_text() == "the running demo's key"
    assert (folder / "demo.pid").read_text() == f"{other_demo}\n"  # still the other demo's


@pytest.mark.timeout(10)
def test_a_stale_pid_file_does_not_hold_the_folder(demo: ModuleType, tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass", "demo.py"])
    gone.wait(10)
    (tmp_path / "demo.pid").write_text(f"{gone.pid}\n")

    assert demo.running_demo(tmp_path) is None
    (tmp_path / "demo.pid").write_text("not a pid\n")
    assert demo.running_demo(tmp_path) is None
