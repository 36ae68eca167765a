"""The benchmark suite runs at a tiny size and writes its report (figures are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_bench_suite_writes_a_report_at_n3(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--sizes",
            "3",
            "--quick",
            "--footprint-seconds",
            "4",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = (out / "REPORT.md").read_text()
    for section in ("## Machine", "## Fleet passes", "## Idle pass cost", "## Footprint"):
        assert section in report
    results = json.loads((out / "results.json").read_text())
    assert [size["n"] for size in results["sizes"]] == [3]
    size = results["sizes"][0]
    assert size["first"] is not None and size["forced"] and size["lower"] and size["idle"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in report
    else:
        assert (out / "scaling.png").stat().st_size > 0


def test_no_idle_window_when_one_sample_ends_both_sweeps() -> None:
    from benchmarks import report

    sample = {"t": 4.0, "passes": 6, "cpu_s": 1.0, "rss_mb": 80.0}
    foot = {
        "targets": 3,
        "samples": [{"t": 2.0, "passes": 0, "cpu_s": 0.5, "rss_mb": 79.0}, sample],
    }

    assert report.idle_window(foot) is None  # the report says "not reached", never divides by 0
    ends_first = {**sample, "t": 3.0, "passes": 3}
    foot["samples"].insert(1, ends_first)
    assert report.idle_window(foot) == (ends_first, sample)
