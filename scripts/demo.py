"""The local demo: a local IAM server and a local Vault, then `rotator run` on config/demo.yaml.

Starts moto's IAM server (authentication enforced) on 127.0.0.1:5055 and an OpenBao dev server
on 127.0.0.1:8255, writes the admin key and the Vault token under .demo/ (mode 0600), runs the
daemon in the foreground, and on Ctrl-C (or SIGTERM) stops the daemon, then both servers, by
their PIDs. Run it with `make demo`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import servers  # noqa: E402 - the same server classes the tests use

DEMO = ROOT / ".demo"
CONFIG = ROOT / "config" / "demo.yaml"
IAM_PORT, VAULT_PORT = 5055, 8255


def write_secret(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def main() -> int:
    DEMO.mkdir(exist_ok=True)
    bin_dir = Path(sys.executable).parent
    iam = servers.MotoServer(log_path=DEMO / "moto.log")
    bao = servers.OpenBaoServer(DEMO / "openbao", log_path=DEMO / "openbao.log")
    try:
        iam.start(port=IAM_PORT)
        bao.start(port=VAULT_PORT)
    except RuntimeError as exc:
        iam.stop()
        bao.stop()
        print(
            f"demo: {exc}\n(is an earlier demo still running? ports {IAM_PORT}, "
            f"{VAULT_PORT} and {VAULT_PORT + 1} must be free)",
            file=sys.stderr,
        )
        return 1
    admin = iam.bootstrap_admin()
    write_secret(
        DEMO / "eim-credentials",
        f"aws_access_key_id = {admin.access_key_id}\n"
        f"aws_secret_access_key = {admin.secret_access_key}\n",
    )
    write_secret(DEMO / "vault-token", bao.root_token + "\n")
    rotator = bin_dir / "rotator"
    rel = Path(os.path.relpath(bin_dir, Path.cwd()))
    print(
        f"""
  local IAM server (moto, auth enforced): {iam.endpoint}   pid {iam.pid}
  local Vault (OpenBao dev):              {bao.address}   pid {bao.pid}

  rotator now runs on config/demo.yaml: a key every 30 s, the old one Active 10 s more,
  then Inactive 10 s, then deleted. In another terminal:

    {rel / "rotator"} status -c config/demo.yaml
    curl -s http://127.0.0.1:9109/metrics | grep ^rotator_
    VAULT_ADDR={bao.address} VAULT_TOKEN={bao.root_token} \\
      {rel / "bao"} kv get secret/monitoring/watcher_1

  Ctrl-C stops rotator and both servers.
""",
        flush=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_"))}
    daemon = subprocess.Popen([str(rotator), "run", "-c", str(CONFIG)], env=env)

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
