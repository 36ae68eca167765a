"""The local demo: a local IAM server and a local Vault, then `rotator run` on config/demo.yaml.

Starts moto's IAM server (authentication enforced) on 127.0.0.1:5055 and an OpenBao dev server
on 127.0.0.1:8255, writes the admin key and the Vault token under .demo/ (mode 0600), runs the
daemon in the foreground, and on Ctrl-C (or SIGTERM) stops the daemon, then both servers, by
their PIDs. Run it with `make demo`.

When those ports are taken, ``ROTATOR_DEMO_PORTS=IAM,VAULT,METRICS`` picks others (Vault needs
VAULT+1 free too); the demo then keeps its files in .demo-IAM/ (``ROTATOR_DEMO_DIR`` names
another folder), so that it never overwrites the key and token of a demo still running, and
writes its own copy of config/demo.yaml there, with those addresses. The e2e test runs it that
way. ``ROTATOR_DEMO_PACE=drill`` runs the copy at a human pace (a key every 30 minutes, 5 of
grace, 5 Inactive) for the runbook's drills, leaving config/demo.yaml as it is.

A folder in use by a running demo (its ``demo.pid``) is refused, whatever the ports.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import servers  # noqa: E402 - the same server classes the tests use

CONFIG = ROOT / "config" / "demo.yaml"
PORTS = (5055, 8255, 9109)  # IAM, Vault, metrics: as config/demo.yaml says
# ROTATOR_DEMO_PACE: the timings of config/demo.yaml's defaults each pace writes over
PACES: dict[str, dict[str, str]] = {
    "demo": {},
    "drill": {"check_interval": "10s", "max_age": "30m", "grace": "5m", "inactive_period": "5m"},
}

PACE_TEXT = {
    "demo": "a key every 30 s, the old one Active 10 s more,\n  then Inactive 10 s, then deleted",
    "drill": "a key every 30 min, the old one Active 5 min more,\n  then Inactive 5 min, then "
    "deleted (the drill pace)",
}


def settings() -> tuple[Path, tuple[int, int, int], str]:
    """The demo folder, the ports and the pace, from the environment (module docstring)."""
    pace = os.environ.get("ROTATOR_DEMO_PACE") or "demo"
    if pace not in PACES:
        raise SystemExit(
            f"demo: ROTATOR_DEMO_PACE={pace!r}: give one of {', '.join(PACES)} (drill: a key "
            "every 30 minutes, for the runbook's drills)"
        )
    ports = _ports()
    folder = ROOT / (".demo" if ports == PORTS else f".demo-{ports[0]}")
    demo = Path(os.environ.get("ROTATOR_DEMO_DIR") or folder).resolve()
    return demo, ports, pace


def _ports() -> tuple[int, int, int]:
    raw = os.environ.get("ROTATOR_DEMO_PORTS", "")
    if not raw:
        return PORTS
    try:
        iam, vault, metrics = (int(p) for p in raw.split(","))
    except ValueError:
        raise SystemExit(
            f"demo: ROTATOR_DEMO_PORTS={raw!r}: give three ports, IAM,VAULT,METRICS "
            "(for example 5055,8255,9109)"
        ) from None
    used = (iam, vault, vault + 1, metrics)  # OpenBao also takes VAULT+1 (its cluster port)
    if not all(1 <= port <= 65535 for port in used) or len(set(used)) < len(used):
        raise SystemExit(
            f"demo: ROTATOR_DEMO_PORTS={raw!r}: IAM, VAULT, VAULT+1 (OpenBao's cluster port) "
            "and METRICS must be four different ports from 1 to 65535 (for example "
            "5055,8255,9109)"
        )
    return iam, vault, metrics


def demo_config(demo: Path, ports: tuple[int, int, int], pace: str = "demo") -> Path:
    """config/demo.yaml itself, or a copy in ``demo`` pointing at other ports and files, at
    another pace."""
    if demo == ROOT / ".demo" and ports == PORTS and pace == "demo":
        return CONFIG
    iam, vault, metrics = ports
    text = CONFIG.read_text()
    header = (
        f"# A copy of {CONFIG} by scripts/demo.py, for ports {iam}, {vault}, {metrics}, "
        f"at the {pace} pace.\n"
    )
    text = header + text.replace("127.0.0.1:5055 ", f"127.0.0.1:{iam} ").replace(
        "127.0.0.1:8255.", f"127.0.0.1:{vault}."
    )
    for old, new in (
        ("http://127.0.0.1:5055", f"http://127.0.0.1:{iam}"),
        ("http://127.0.0.1:8255", f"http://127.0.0.1:{vault}"),
        ("127.0.0.1:9109", f"127.0.0.1:{metrics}"),
        ("../.demo/", f"{demo}/"),
        ("policies/", f"{CONFIG.parent / 'policies'}/"),
    ):
        if old not in text:
            raise SystemExit(f"demo: {CONFIG} no longer says {old!r}; update scripts/demo.py")
        text = text.replace(old, new)
    for key, value in PACES[pace].items():
        text, found = re.subn(rf"(?m)^(  {key}: ).*$", rf"\g<1>{value}", text, count=1)
        if not found:
            raise SystemExit(f"demo: {CONFIG} sets no {key} in defaults; update scripts/demo.py")
    path = demo / "demo.yaml"
    path.write_text(text)
    return path


def write_secret(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def running_demo(demo: Path) -> int | None:
    """The PID of a demo still running on the folder ``demo`` (its demo.pid), if any."""
    try:
        pid = int((demo / "demo.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None  # no pid file, or a stale one: that demo is gone
    return pid if b"demo.py" in cmdline and pid != os.getpid() else None


def main() -> int:
    demo, ports, pace = settings()
    iam_port, vault_port, metrics_port = ports
    # Checked before anything starts or is written: a second demo must not reset the IAM
    # server of one still running, nor overwrite its key and token files.
    if (pid := running_demo(demo)) is not None:
        print(
            f"demo: {demo} is the folder of the demo running as PID {pid}, whose admin key and "
            "Vault token are there; stop it, or give this one its own folder with "
            "ROTATOR_DEMO_DIR (and its own ports with ROTATOR_DEMO_PORTS=IAM,VAULT,METRICS)",
            file=sys.stderr,
        )
        return 1
    if taken := servers.taken_ports(iam_port, vault_port, vault_port + 1, metrics_port):
        print(
            f"demo: port {', '.join(map(str, taken))} of 127.0.0.1 is taken (is an earlier demo "
            f"still running?): ports {iam_port}, {vault_port}, {vault_port + 1} and "
            f"{metrics_port} must be free; stop the other demo, or choose other ports with "
            "ROTATOR_DEMO_PORTS=IAM,VAULT,METRICS (that demo then keeps its files in "
            ".demo-IAM/, or in ROTATOR_DEMO_DIR)",
            file=sys.stderr,
        )
        return 1
    demo.mkdir(exist_ok=True)
    (demo / "demo.pid").write_text(f"{os.getpid()}\n")
    try:
        return run(demo, ports, pace)
    finally:
        (demo / "demo.pid").unlink(missing_ok=True)


def run(demo: Path, ports: tuple[int, int, int], pace: str) -> int:
    """Start both servers, write the key and token, run rotator until it stops."""
    iam_port, vault_port, metrics_port = ports
    config = demo_config(demo, ports, pace)
    shown = os.path.relpath(config, Path.cwd())
    bin_dir = Path(sys.executable).parent
    iam = servers.MotoServer(log_path=demo / "moto.log")
    bao = servers.OpenBaoServer(demo / "openbao", log_path=demo / "openbao.log")
    try:
        iam.start(port=iam_port)
        bao.start(port=vault_port)
    except RuntimeError as exc:
        iam.stop()
        bao.stop()
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    admin = iam.bootstrap_admin()
    write_secret(
        demo / "eim-credentials",  # with a header, as the aws CLI wants (the runbook's drills)
        "[default]\n"
        f"aws_access_key_id = {admin.access_key_id}\n"
        f"aws_secret_access_key = {admin.secret_access_key}\n",
    )
    write_secret(demo / "vault-token", bao.root_token + "\n")
    rotator = bin_dir / "rotator"
    rel = Path(os.path.relpath(bin_dir, Path.cwd()))
    print(
        f"""
  local IAM server (moto, auth enforced): {iam.endpoint}   pid {iam.pid}
  local Vault (OpenBao dev):              {bao.address}   pid {bao.pid}

  rotator now runs on {shown}: {PACE_TEXT[pace]}.
  Its files: {os.path.relpath(demo, Path.cwd())}/. In another terminal:

    {rel / "rotator"} status -c {shown}
    curl -s http://127.0.0.1:{metrics_port}/metrics | grep ^rotator_
    VAULT_ADDR={bao.address} VAULT_TOKEN={bao.root_token} \\
      {rel / "bao"} kv get secret/monitoring/watcher_1

  Ctrl-C stops rotator and both servers.
""",
        flush=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_"))}
    daemon = subprocess.Popen([str(rotator), "run", "-c", str(config)], env=env)

    def forward(signum: int, _frame: object) -> None:
        daemon.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        code = daemon.wait()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        bao.stop()
        iam.stop()
    print(f"demo: rotator exited with {code}; servers stopped", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
