"""Footprint of a `rotator run` daemon process: RSS, CPU, time to ready, passes done.

Read from /proc/<pid>/status (VmRSS) and /proc/<pid>/stat (utime + stime); passes counted from
the daemon's own log (its ``pass_summary`` lines), so sampling adds no work to the daemon; the
CPU of a /metrics scrape is measured apart at the end. The daemon is started by this process,
stopped with SIGTERM by its PID and waited for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except OSError:
        return 0, ""


def passes_done(log_path: Path) -> int:
    """Passes the daemon has finished: its ``pass_summary`` log lines (one per target-pass)."""
    try:
        return log_path.read_bytes().count(b'"pass_summary"')
    except OSError:
        return -1


def interval_seconds(text: str) -> float:
    """``30s``, ``5m``, ``1h`` as seconds (the bench's own configs only)."""
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]]


@dataclass
class Sample:
    t: float  # seconds since start
    rss_mb: float
    cpu_s: float
    passes: int


@dataclass
class Footprint:
    targets: int
    check_interval: str
    ready_seconds: float | None = None
    rss_ready_mb: float = 0.0
    first_sweep_seconds: float | None = None
    rss_first_sweep_mb: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    scrape_cpu_ms: float | None = None  # CPU the daemon spends answering one /metrics scrape
    scrape_bytes: int = 0
    error: str | None = None

    @property
    def last(self) -> Sample:
        return self.samples[-1]

    def idle_window(self) -> tuple[Sample, Sample] | None:
        """From the end of the first sweep to the end of the second: one whole check_interval
        of idle passes, every target once, with the idle time between them."""
        first = next((s for s in self.samples if s.passes >= self.targets), None)
        second = next((s for s in self.samples if s.passes >= 2 * self.targets), None)
        if first is None or second is None or second.t <= first.t:
            return None
        return first, second

    def idle_cpu_per_pass(self) -> float | None:
        """CPU seconds per target-pass over the idle window."""
        window = self.idle_window()
        if window is None:
            return None
        first, second = window
        return (second.cpu_s - first.cpu_s) / max(second.passes - first.passes, 1)

    def idle_cpu_per_minute(self) -> float | None:
        """CPU seconds per minute over the idle window (what the daemon costs when idle)."""
        window = self.idle_window()
        if window is None:
            return None
        first, second = window
        return (second.cpu_s - first.cpu_s) / (second.t - first.t) * 60


def measure(
    config: Path,
    port: int,
    targets: int,
    check_interval: str,
    seconds: float,
    log_path: Path,
    *,
    min_passes: int,
) -> Footprint:
    """Run the daemon until ``min_passes`` passes after the first sweep, and ``seconds`` at
    least (at most about two check intervals); then time a few /metrics scrapes."""
    result = Footprint(targets, check_interval)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_"))}
    exe = str(Path(sys.executable).parent / "rotator")
    with log_path.open("wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            [exe, "run", "-c", str(config)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _watch(process, port, started, seconds, min_passes, result, log_path)
            if process.poll() is None:
                _time_scrapes(process.pid, port, result)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
    return result


def _watch(
    process: subprocess.Popen[bytes],
    port: int,
    started: float,
    seconds: float,
    min_passes: int,
    result: Footprint,
    log_path: Path,
) -> None:
    pid = process.pid
    deadline = started + 120
    while result.ready_seconds is None:
        if process.poll() is not None or time.monotonic() > deadline:
            result.error = f"daemon not ready (exit {process.poll()})"
            return
        if _get(port, "/readyz")[0] == 200:
            result.ready_seconds = time.monotonic() - started
            result.rss_ready_mb = rss_mb(pid)
        else:
            time.sleep(0.02)  # polling with a deadline
    end = time.monotonic() + seconds
    sweep_deadline = time.monotonic() + max(seconds, 1.3 * interval_seconds(result.check_interval))
    sweep_deadline += 600  # the first sweep's own time
    while process.poll() is None:
        now = time.monotonic()
        passes = passes_done(log_path)
        sample = Sample(now - started, rss_mb(pid), cpu_seconds(pid), passes)
        result.samples.append(sample)
        if result.first_sweep_seconds is None and passes >= result.targets:
            result.first_sweep_seconds = sample.t
            result.rss_first_sweep_mb = sample.rss_mb
        done_idle = passes - result.targets
        if result.first_sweep_seconds is not None and now >= end and done_idle >= min_passes:
            return
        if now > sweep_deadline:
            return
        time.sleep(2.0)  # sampling period
    result.error = f"daemon exited with {process.returncode}"


def _time_scrapes(pid: int, port: int, result: Footprint, count: int = 3) -> None:
    before = cpu_seconds(pid)
    for _ in range(count):
        status, text = _get(port, "/metrics")
        if status != 200:
            return
        result.scrape_bytes = len(text.encode())
    result.scrape_cpu_ms = (cpu_seconds(pid) - before) / count * 1000
