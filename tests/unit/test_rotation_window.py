"""rotation_window: the cron window is checked with the trigger the engine asks each pass; a
window that never opens is refused, one that stays shut longer than max_age or opens for less
than check_interval is noted."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator import cli, config, daemon, errors

NOW = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)  # a Friday


def settings(tmp_path: Path, *targets: dict[str, Any], **defaults: Any) -> config.Settings:
    data = {
        "vault": {"address": "https://vault.example:8200"},
        "defaults": defaults,
        "targets": list(targets) or [target("t1")],
    }
    path = tmp_path / "rotator.yaml"
    path.write_text(yaml.safe_dump(data))
    return config.load(path)


def target(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "user": f"u-{name}", "secret_path": f"p/{name}", **extra}


def refused(loaded: config.Settings) -> errors.ConfigError:
    with pytest.raises(errors.ConfigError) as info:
        daemon.target_specs(loaded, NOW)
    return info.value


def test_a_window_that_never_opens_is_refused_naming_the_key(tmp_path: Path) -> None:
    error = refused(settings(tmp_path, rotation_window="0 0 30 2 *"))

    assert error.path == "defaults.rotation_window"
    assert "'0 0 30 2 *' never opens" in error.message
    assert "fix the day and month fields" in error.message


def test_a_target_window_that_never_opens_is_refused_naming_the_target_key(
    tmp_path: Path,
) -> None:
    loaded = settings(tmp_path, target("t1"), target("t2", rotation_window="0 0 31 4 *"))

    error = refused(loaded)

    assert error.path == "targets[1].rotation_window"
    assert "never opens" in error.message


@pytest.mark.parametrize(
    ("window", "max_age", "opening"),
    [
        ("0 0 29 2 *", "30d", "2028-02-29 00:00"),  # every four years
        ("0 0 1 1 *", "30d", "2028-01-01 00:00"),  # once a year: whatever the date
        ("0 0 31 * *", "30d", "2027-03-31 00:00"),  # no 31st in February
        ("0 3 * * mon", "3d", "2026-12-14 03:00"),  # weekly, kept for three days
    ],
)
def test_a_window_shut_longer_than_max_age_is_noted_saying_until_when(
    tmp_path: Path, window: str, max_age: str, opening: str
) -> None:
    loaded = settings(
        tmp_path, rotation_window=window, max_age=max_age, grace="1h", inactive_period="1h"
    )

    [note] = rare_notes(loaded)

    assert note.startswith(f"rotation_window '{window}' (target t1) does not open between")
    assert f"and {opening} UTC, longer than max_age {max_age}" in note
    assert "opens at least once every max_age" in note


def test_a_default_window_too_rare_for_one_targets_max_age_names_that_target(
    tmp_path: Path,
) -> None:
    loaded = settings(
        tmp_path,
        target("t1"),
        target("t2", max_age="2d", grace="1h", inactive_period="1h"),
        rotation_window="0 3 * * mon",
    )

    [note] = rare_notes(loaded)

    assert "(target t2)" in note and "longer than max_age 2d" in note


def rare_notes(loaded: config.Settings) -> list[str]:
    specs = daemon.target_specs(loaded, NOW)
    return [n for n in daemon.config_warnings(specs, NOW) if "longer than max_age" in n]


@pytest.mark.parametrize(
    ("window", "max_age"),
    [
        ("* 8-17 * * mon-fri", "30d"),
        ("0 3 * * *", "1d"),  # a daily window opens again as the key reaches max_age
        ("0 0 1 1 *", "366d"),
        ("0 0 1 * *", "31d"),
    ],
)
def test_a_window_that_opens_every_max_age_is_accepted_and_not_noted(
    tmp_path: Path, window: str, max_age: str
) -> None:
    loaded = settings(
        tmp_path, rotation_window=window, max_age=max_age, grace="1h", inactive_period="1h"
    )

    [spec] = daemon.target_specs(loaded, NOW)

    assert spec.window_open is not None
    assert rare_notes(loaded) == []


def test_the_window_is_open_in_the_minutes_it_matches() -> None:
    window = daemon.rotation_window("0-1 3 * * *", "defaults.rotation_window")

    assert window is not None
    assert window(datetime(2026, 12, 4, 3, 0, 59, tzinfo=UTC))
    assert window(datetime(2026, 12, 4, 3, 1, 30, tzinfo=UTC))
    assert not window(datetime(2026, 12, 4, 3, 2, tzinfo=UTC))
    assert not window(datetime(2026, 12, 4, 2, 59, 59, tzinfo=UTC))


def notes(tmp_path: Path, *targets: dict[str, Any], **defaults: Any) -> list[str]:
    specs = daemon.target_specs(settings(tmp_path, *targets, **defaults), NOW)
    return [n for n in daemon.config_warnings(specs, NOW) if "rotation_window" in n]


def test_a_window_shorter_than_check_interval_is_noted_with_the_fix(tmp_path: Path) -> None:
    [note] = notes(tmp_path, target("t1"), target("t2"), rotation_window="0 3 * * *")

    assert note.startswith(
        "rotation_window '0 3 * * *' (target t1, t2) opens for 1m at a time, less than "
        "check_interval 5m"
    )
    assert "'0-9 3 * * *'" in note and "or shorten check_interval" in note


@pytest.mark.parametrize(
    ("window", "check_interval"),
    [
        ("0-4 3 * * *", "5m"),
        ("0 3 * * *", "1m"),
        ("0 3 * * *", "30s"),
        ("* 8-17 * * mon-fri", "1h"),
    ],
)
def test_a_window_at_least_check_interval_long_is_not_noted(
    tmp_path: Path, window: str, check_interval: str
) -> None:
    assert notes(tmp_path, rotation_window=window, check_interval=check_interval) == []


def test_a_window_open_now_is_measured_from_its_start_not_from_now(tmp_path: Path) -> None:
    # At 17:58 the window '* 8-17 * * *' has two minutes left: it is still ten hours long.
    specs = daemon.target_specs(
        settings(tmp_path, rotation_window="* 8-17 * * *", check_interval="15m"), NOW
    )
    late = NOW.replace(hour=17, minute=58)

    assert not [n for n in daemon.config_warnings(specs, late) if "rotation_window" in n]


def test_check_config_refuses_a_window_that_never_opens_and_notes_a_short_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rotator.yaml"
    data = {
        "vault": {"address": "https://vault.example:8200"},
        "defaults": {"rotation_window": "0 0 30 2 *"},
        "targets": [target("t1")],
    }
    path.write_text(yaml.safe_dump(data))

    assert cli.main(["check-config", "--skip-secret-files", "-c", str(path)]) == cli.EXIT_USAGE
    assert "defaults.rotation_window: rotation_window '0 0 30 2 *' never opens" in (
        capsys.readouterr().err
    )

    data["defaults"] = {"rotation_window": "0 3 * * *"}
    path.write_text(yaml.safe_dump(data))

    assert cli.main(["check-config", "--skip-secret-files", "-c", str(path)]) == cli.EXIT_OK
    assert "note: rotation_window '0 3 * * *' (target t1) opens for 1m" in capsys.readouterr().out
