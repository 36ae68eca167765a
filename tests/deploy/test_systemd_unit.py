"""deploy/systemd/rotator.service: verified by systemd-analyze, hardened to 2.0 or better."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import yaml

from tests.deploy import tools

UNIT = tools.DEPLOY / "systemd" / "rotator.service"
INSTALLED_BINARY = "/opt/rotator/venv/bin/rotator"
MAX_EXPOSURE = 2.0


def _service_section() -> dict[str, list[str]]:
    """[Service] as key -> every value given (LoadCredential= and others repeat)."""
    values: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    analyze = tools.find("systemd-analyze")
    # verify checks that ExecStart= is executable, and /opt/rotator is where the unit is
    # installed, not where the tests run: point that one path at this checkout's venv.
    venv_rotator = tools.ROOT / ".venv" / "bin" / "rotator"
    assert venv_rotator.exists(), "make creates .venv/bin/rotator"
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    unit = tmp_path / "rotator.service"
    unit.write_text(text.replace(INSTALLED_BINARY, str(venv_rotator)))
    result = tools.run(analyze, "verify", str(unit))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_systemd_analyze_verify_would_report_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: an unknown key in the unit is reported."""
    analyze = tools.find("systemd-analyze")
    unit = tmp_path / "rotator.service"
    text = UNIT.read_text().replace(INSTALLED_BINARY, str(tools.ROOT / ".venv/bin/rotator"))
    unit.write_text(text.replace("[Service]\n", "[Service]\nWatchdogSecs=60s\n"))
    result = tools.run(analyze, "verify", str(unit))
    assert "WatchdogSecs" in result.stdout + result.stderr


def test_security_exposure_is_2_or_better() -> None:
    analyze = tools.find("systemd-analyze")
    result = tools.run(analyze, "security", "--offline=yes", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for rotator\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout[-2000:]
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{result.stdout}"
    # --threshold (x10) is what make deploy-check uses: it must agree.
    gated = tools.run(
        analyze, "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)
    )
    assert gated.returncode == 0


def test_unit_is_notify_with_watchdog_reload_and_restart() -> None:
    service = _service_section()
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["WatchdogSec"] and service["WatchdogSec"][0].endswith("s")
    assert service["DynamicUser"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["ProtectSystem"] == ["strict"]
    assert service["SystemCallFilter"][0] == "@system-service"
    assert service["ExecStart"] == [f"{INSTALLED_BINARY} run -c /etc/rotator/rotator.yaml"]


def test_load_credentials_are_the_ones_the_example_config_names() -> None:
    """config/rotator.example.yaml reads credential:NAME; the unit must load each NAME."""
    loaded = {value.partition(":")[0] for value in _service_section()["LoadCredential"]}
    assert loaded == {"eim-credentials", "vault-token"}
    example = yaml.safe_load((tools.ROOT / "config" / "rotator.example.yaml").read_text())
    named = {
        example["eim"]["credentials_file"],
        example["vault"]["auth"]["token_file"],
    }
    assert named == {f"credential:{name}" for name in loaded}


def test_unit_parses_as_ini_with_the_three_sections() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser["Install"]["WantedBy"] == "multi-user.target"
