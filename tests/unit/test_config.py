"""rotator.config: loading, validation with key paths, durations, and secret files read at use."""

from __future__ import annotations

import copy
import json
import os
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from rotator import config, errors, model

REPO = Path(__file__).resolve().parents[2]
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["ec2:Describe*"], "Resource": ["*"]}],
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


def base() -> dict[str, Any]:
    return {
        "vault": {"address": "https://vault.example:8200"},
        "targets": [{"name": "monitoring", "user": "watcher_1", "secret_path": "monitoring/w1"}],
    }


def second_target(**extra: Any) -> dict[str, Any]:
    return {"name": "backup", "user": "backup_1", "secret_path": "backup/b1", **extra}


def write(directory: Path, data: dict[str, Any] | str, name: str = "rotator.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def load(directory: Path, data: dict[str, Any] | str) -> config.Settings:
    return config.load(write(directory, data))


def rejected(directory: Path, data: dict[str, Any] | str) -> errors.ConfigError:
    with pytest.raises(errors.ConfigError) as info:
        load(directory, data)
    error = info.value
    assert type(error) is errors.ConfigError
    assert "\n" not in str(error)
    assert error.__cause__ is None  # no chained pydantic/yaml traceback
    return error


def put(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts and lists, creating dicts on the way."""
    node: Any = data
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for part in parts[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[parts[-1]] = value


def delete(data: dict[str, Any], dotted: str) -> None:
    node: Any = data
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for part in parts[:-1]:
        node = node[part]
    del node[parts[-1]]


def setting(*pairs: tuple[str, Any]) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for dotted, value in pairs:
            put(data, dotted, value)

    return change


def removing(dotted: str) -> Callable[[dict[str, Any]], None]:
    return lambda data: delete(data, dotted)


# --- the shipped examples --------------------------------------------------------------------


def test_production_example_loads_with_the_seed_monitoring_target() -> None:
    settings = config.load(REPO / "config" / "rotator.example.yaml")

    assert settings.eim.provider == "outscale"
    assert settings.eim.endpoint_url == "https://eim.eu-west-2.outscale.com"
    assert settings.vault.address == "https://vault.example:8200"
    (target,) = settings.targets
    assert (target.name, target.user, target.group) == ("monitoring", "watcher_1", "monitoring")
    assert target.secret_path == "monitoring/watcher_1"
    assert target.policy is not None
    assert target.policy.name == "monitoring"
    assert target.policy.description == "Allow describe for every item"
    assert target.policy.document_file == REPO / "config" / "policies" / "monitoring.json"
    assert target.policy.document["Statement"][0]["Sid"] == "AllowDescribe"
    assert target.timing == config.Timing()
    assert settings.source == REPO / "config" / "rotator.example.yaml"


def test_production_example_uses_systemd_credentials_left_unresolved_until_read() -> None:
    settings = config.load(REPO / "config" / "rotator.example.yaml")

    assert str(settings.eim.credentials_file) == "credential:eim-credentials"
    assert str(settings.vault.auth.token_file) == "credential:vault-token"


def test_demo_config_loads_with_shrunk_timings_and_local_servers() -> None:
    settings = config.load(REPO / "config" / "demo.yaml")

    assert settings.eim.endpoint_url == "http://127.0.0.1:5055"
    assert settings.eim.region == "us-east-1"
    demo = REPO / "config" / ".." / ".demo"
    assert settings.eim.credentials_file == demo / "eim-credentials"
    assert settings.vault.address == "http://127.0.0.1:8255"
    assert settings.vault.auth.token_file == demo / "vault-token"
    assert (settings.vault.mount, settings.vault.state_path) == ("secret", "rotator")
    timing = settings.targets[0].timing
    assert timing.check_interval == timedelta(seconds=2)
    assert timing.max_age == timedelta(seconds=30)
    assert timing.grace == timing.inactive_period == timedelta(seconds=10)
    assert timing.verify_timeout == timedelta(seconds=20)
    assert timing.identity_check_interval == timedelta(minutes=1)
    assert settings.workers == 2
    assert (settings.metrics.host, settings.metrics.port) == ("127.0.0.1", 9109)
    assert settings.logging.level == "info"


def test_seed_policy_file_is_the_monitoring_policy() -> None:
    document = json.loads((REPO / "config" / "policies" / "monitoring.json").read_text())

    assert document == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AllowDescribe",
                "Effect": "Allow",
                "Action": ["ec2:Describe*", "elasticloadbalancing:Describe*"],
                "Resource": ["*"],
            }
        ],
    }


# --- defaults --------------------------------------------------------------------------------


def test_minimal_config_gets_every_default(tmp_path: Path) -> None:
    settings = load(tmp_path, base())

    assert settings.eim == config.EimSettings()
    assert settings.eim.connect_timeout == timedelta(seconds=5)
    assert settings.eim.read_timeout == timedelta(seconds=15)
    assert settings.eim.max_attempts == 5
    assert settings.eim.signing_name == "iam"
    assert settings.eim.verify_action == "iam:GetUser"
    assert settings.eim.credentials_file is None
    assert settings.vault.auth.method == "token"
    assert settings.vault.lock_ttl == timedelta(seconds=15)
    assert settings.vault.timeout == timedelta(seconds=10)
    assert settings.defaults == config.Timing(
        check_interval=timedelta(minutes=5),
        max_age=timedelta(days=30),
        grace=timedelta(hours=24),
        inactive_period=timedelta(days=3),
        max_keys=2,
        verify_timeout=timedelta(minutes=2),
        identity_check_interval=timedelta(hours=1),
        rotation_window=None,
    )
    assert settings.workers == 4
    assert settings.metrics.listen == "0.0.0.0:9109"
    assert settings.logging.format is None
    assert settings.logging.level == "info"
    assert settings.source == tmp_path / "rotator.yaml"


def test_blocks_holding_only_comments_count_as_empty(tmp_path: Path) -> None:
    text = yaml.safe_dump(base()) + "eim:\n  # nothing yet\ndefaults:\nmetrics:\nlogging:\n"

    settings = load(tmp_path, text)

    assert settings.eim == config.EimSettings()
    assert settings.defaults == config.Timing()


def test_targets_inherit_defaults_and_override_them_one_key_at_a_time(tmp_path: Path) -> None:
    data = base()
    data["defaults"] = {"max_age": "10d", "rotation_window": "* 8-17 * * mon-fri"}
    data["targets"][0]["max_age"] = "7d"
    data["targets"][0]["max_keys"] = 3
    data["targets"].append(second_target(grace="2h", rotation_window="0 3 * * *"))

    settings = load(tmp_path, data)

    first, second = settings.targets
    assert first.timing.max_age == timedelta(days=7)
    assert first.timing.max_keys == 3
    assert first.timing.grace == timedelta(hours=24)  # built-in default, not overridden
    assert first.timing.rotation_window == "* 8-17 * * mon-fri"
    assert second.timing.max_age == timedelta(days=10)
    assert second.timing.max_keys == 2
    assert second.timing.grace == timedelta(hours=2)
    assert second.timing.rotation_window == "0 3 * * *"
    assert settings.defaults.max_age == timedelta(days=10)  # the defaults block is untouched
    assert first.overrides == {"max_age": timedelta(days=7), "max_keys": 3}


def test_target_built_by_hand_merges_its_overrides_with_the_builtin_defaults() -> None:
    target = config.Target(name="t", user="u", secret_path="p", max_age=timedelta(days=7))

    assert target.timing == config.Timing(max_age=timedelta(days=7))
    assert target.with_defaults(config.Timing(grace=timedelta(hours=1))).timing.grace == timedelta(
        hours=1
    )


# --- rejections, each naming its key ---------------------------------------------------------

REJECTIONS: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("provider", setting(("eim.provider", "gcp")), "eim.provider", "'outscale' or 'aws'"),
    ("region", setting(("eim.region", "EU WEST")), "eim.region", "region name"),
    ("endpoint scheme", setting(("eim.endpoint", "ftp://eim.example")), "eim.endpoint", "https"),
    ("endpoint no host", setting(("eim.endpoint", "https://")), "eim.endpoint", "invalid URL"),
    ("endpoint port", setting(("eim.endpoint", "https://h:99999")), "eim.endpoint", "port"),
    ("signing name", setting(("eim.signing_name", " ")), "eim.signing_name", "empty"),
    ("attempts low", setting(("eim.max_attempts", 0)), "eim.max_attempts", "greater than"),
    ("attempts high", setting(("eim.max_attempts", 21)), "eim.max_attempts", "less than"),
    ("attempts text", setting(("eim.max_attempts", "5")), "eim.max_attempts", "whole number"),
    ("verify", setting(("eim.verify_action", "iam:ListUsers")), "eim.verify_action", "GetUser"),
    ("timeout", setting(("eim.read_timeout", 15)), "eim.read_timeout", "invalid duration '15'"),
    ("cred path", setting(("eim.credentials_file", "")), "eim.credentials_file", "empty"),
    ("vault address", setting(("vault.address", "vault:8200")), "vault.address", "invalid URL"),
    ("auth method", setting(("vault.auth.method", "ldap")), "vault.auth.method", "'approle'"),
    (
        "approle block",
        setting(("vault.auth.method", "approle")),
        "vault.auth.approle",
        "role_id and secret_id_file",
    ),
    (
        "approle role",
        setting(
            ("vault.auth.method", "approle"), ("vault.auth.approle", {"secret_id_file": "sid"})
        ),
        "vault.auth.approle.role_id",
        "missing",
    ),
    (
        "k8s block",
        setting(("vault.auth.method", "kubernetes")),
        "vault.auth.kubernetes",
        "kubernetes block",
    ),
    (
        "credential ref",
        setting(("vault.auth.token_file", "credential:../x")),
        "vault.auth.token_file",
        "credential:NAME",
    ),
    ("mount slash", setting(("vault.mount", "/secret")), "vault.mount", "leading and trailing"),
    ("state path", setting(("vault.state_path", "a//b")), "vault.state_path", "segments"),
    ("lock ttl", setting(("vault.lock_ttl", "0s")), "vault.lock_ttl", "greater than zero"),
    ("vault block", setting(("vault", "https://v:8200")), "vault", "mapping of keys"),
    (
        "max keys",
        setting(("defaults.max_keys", 1)),
        "defaults.max_keys",
        "one slot for the new key",
    ),
    ("target max keys", setting(("targets.0.max_keys", 1)), "targets[0].max_keys", "at least 2"),
    (
        "cron fields",
        setting(("defaults.rotation_window", "0 8 * *")),
        "defaults.rotation_window",
        "5 fields",
    ),
    (
        "cron name",
        setting(("targets.0.rotation_window", "0 8 * * funday")),
        "targets[0].rotation_window",
        "cron",
    ),
    (
        "cron chars",
        setting(("defaults.rotation_window", "0 8 * * ?")),
        "defaults.rotation_window",
        "cron",
    ),
    ("name leading", setting(("targets.0.name", "-bad")), "targets[0].name", "invalid target name"),
    ("name slash", setting(("targets.0.name", "a/b")), "targets[0].name", "Vault path segment"),
    ("name long", setting(("targets.0.name", "a" * 64)), "targets[0].name", "1-63"),
    ("name number", setting(("targets.0.name", 12)), "targets[0].name", "quote the value"),
    (
        "listen port alone",
        setting(("metrics.listen", 9109)),
        "metrics.listen",
        "the port 9109 alone: give '0.0.0.0:9109' (every interface) or '127.0.0.1:9109'",
    ),
    ("user space", setting(("targets.0.user", "bad user")), "targets[0].user", "1-64"),
    ("user long", setting(("targets.0.user", "u" * 65)), "targets[0].user", "invalid user name"),
    ("user empty", setting(("targets.0.user", "")), "targets[0].user", "invalid user name"),
    ("group", setting(("targets.0.group", "bad group")), "targets[0].group", "invalid group"),
    ("path lead", setting(("targets.0.secret_path", "/a/b")), "targets[0].secret_path", "leading"),
    (
        "path trail",
        setting(("targets.0.secret_path", "a/b/")),
        "targets[0].secret_path",
        "trailing",
    ),
    (
        "path empty seg",
        setting(("targets.0.secret_path", "a//b")),
        "targets[0].secret_path",
        "empty",
    ),
    ("path dotdot", setting(("targets.0.secret_path", "a/../b")), "targets[0].secret_path", "'..'"),
    ("path query", setting(("targets.0.secret_path", "a?b")), "targets[0].secret_path", "'?'"),
    ("path missing", removing("targets.0.secret_path"), "targets[0].secret_path", "missing"),
    (
        "inside state",
        setting(("targets.0.secret_path", "rotator/monitoring")),
        "targets[0].secret_path",
        "vault.state_path",
    ),
    (
        "policy no group",
        setting(("targets.0.policy", {"name": "p", "document": POLICY})),
        "targets[0].group",
        "policy needs group",
    ),
    (
        "policy both",
        setting(
            ("targets.0.group", "g"),
            ("targets.0.policy", {"name": "p", "document": POLICY, "document_file": "p.json"}),
        ),
        "targets[0].policy.document",
        "not both",
    ),
    (
        "policy neither",
        setting(("targets.0.group", "g"), ("targets.0.policy", {"name": "p"})),
        "targets[0].policy",
        "document_file",
    ),
    (
        "policy name",
        setting(
            ("targets.0.group", "g"), ("targets.0.policy", {"name": "a b", "document": POLICY})
        ),
        "targets[0].policy.name",
        "invalid policy name",
    ),
    (
        "policy path",
        setting(
            ("targets.0.group", "g"),
            ("targets.0.policy", {"name": "p", "path": "rotator", "document": POLICY}),
        ),
        "targets[0].policy.path",
        "starting and ending with '/'",
    ),
    (
        "no statement",
        setting(
            ("targets.0.group", "g"),
            ("targets.0.policy", {"name": "p", "document": {"statement": []}}),
        ),
        "targets[0].policy.document",
        "no Statement",
    ),
    (
        "statement type",
        setting(
            ("targets.0.group", "g"),
            ("targets.0.policy", {"name": "p", "document": {"Statement": "Allow"}}),
        ),
        "targets[0].policy.document",
        "object or a non-empty list",
    ),
    (
        "effect",
        setting(
            ("targets.0.group", "g"),
            ("targets.0.policy", {"name": "p", "document": {"Statement": {"Action": "*"}}}),
        ),
        "targets[0].policy.document",
        "Effect Allow or Deny",
    ),
    (
        "too long",
        setting(
            ("targets.0.group", "g"),
            (
                "targets.0.policy",
                {
                    "name": "p",
                    "document": {
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Action": [f"ec2:Describe{i:04}" for i in range(400)],
                            }
                        ]
                    },
                },
            ),
        ),
        "targets[0].policy.document",
        "at most 5120",
    ),
    ("no targets", setting(("targets", [])), "targets", "at least one target"),
    ("targets missing", removing("targets"), "targets", "required key is missing"),
    ("targets mapping", setting(("targets", {"name": "x"})), "targets", "expected a list"),
    ("workers low", setting(("workers", 0)), "workers", "greater than or equal to 1"),
    ("workers high", setting(("workers", 65)), "workers", "less than or equal to 64"),
    ("log format", setting(("logging.format", "xml")), "logging.format", "'json' or 'console'"),
    ("log level", setting(("logging.level", "verbose")), "logging.level", "'debug'"),
    (
        "verify timeout",
        setting(
            ("targets.0.max_age", "2m"),
            ("targets.0.grace", "10s"),
            ("targets.0.inactive_period", "10s"),
        ),
        "targets[0].verify_timeout",
        "verify_timeout (2m) must be shorter than max_age (2m)",
    ),
    (
        "check interval",
        setting(
            ("defaults.check_interval", "1d"),
            ("defaults.max_age", "1d"),
            ("defaults.grace", "1h"),
            ("defaults.inactive_period", "1h"),
        ),
        "targets[0].check_interval",
        "shorter than max_age",
    ),
]


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_invalid_value_is_rejected_naming_its_key_path(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], path: str, fragment: str
) -> None:
    data = base()
    change(data)

    error = rejected(tmp_path, data)

    assert error.path == path
    assert str(error).startswith(f"{path}: ")
    assert fragment in error.message


def test_slot_rule_with_two_keys_says_why_and_how_to_fix(tmp_path: Path) -> None:
    data = base()
    data["targets"][0]["max_age"] = "2d"  # grace 24h + inactive_period 3d inherited

    error = rejected(tmp_path, data)

    assert str(error) == (
        "targets[0]: grace (1d) + inactive_period (3d) must be shorter than max_age (2d) with "
        "max_keys 2, or the next rotation would find no free key slot; shorten grace or "
        "inactive_period, lengthen max_age, or raise max_keys"
    )


def test_slot_rule_rejects_equality_too(tmp_path: Path) -> None:
    data = base()
    data["defaults"] = {"max_age": "4d", "grace": "1d", "inactive_period": "3d"}

    assert rejected(tmp_path, data).path == "targets[0]"


def test_slot_rule_with_more_keys_allows_max_keys_minus_one_rotations(tmp_path: Path) -> None:
    data = base()
    data["targets"][0].update(max_age="3d", max_keys=3)  # 1d + 3d: > max_age, < 2 x max_age
    data["targets"].append(second_target(max_age="3d", max_keys=3, inactive_period="5d"))

    error = rejected(tmp_path, data)

    assert error.path == "targets[1]"
    assert "must be shorter than 2 x max_age (6d) with max_keys 3" in error.message
    data["targets"].pop()
    assert load(tmp_path, data).targets[0].timing.max_keys == 3


def test_duplicate_target_names_are_rejected_at_the_second(tmp_path: Path) -> None:
    data = base()
    data["targets"].append(second_target(name="monitoring"))

    error = rejected(tmp_path, data)

    assert error.path == "targets[1].name"
    assert "targets[0]" in error.message


def test_duplicate_users_are_rejected_ignoring_case(tmp_path: Path) -> None:
    data = base()
    data["targets"].append(second_target(user="Watcher_1"))

    error = rejected(tmp_path, data)

    assert error.path == "targets[1].user"
    assert "already managed by targets[0]" in error.message


def test_duplicate_secret_paths_are_rejected(tmp_path: Path) -> None:
    data = base()
    data["targets"].append(second_target(secret_path="monitoring/w1"))

    assert rejected(tmp_path, data).path == "targets[1].secret_path"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("document", {"Statement": [{"Effect": "Deny", "Action": "*", "Resource": "*"}]}),
        ("description", "something else"),
        ("path", "/other/"),
    ],
)
def test_one_policy_name_with_two_definitions_is_rejected(
    tmp_path: Path, field: str, value: Any
) -> None:
    data = base()
    policy = {"name": "shared", "description": "d", "document": POLICY}
    data["targets"][0].update(group="g", policy=policy)
    data["targets"].append(second_target(group="g", policy={**policy, field: value}))

    error = rejected(tmp_path, data)

    assert error.path == "targets[1].policy"
    assert f"targets[0] with a different {field}" in error.message


def test_one_policy_shared_by_two_targets_is_accepted(tmp_path: Path) -> None:
    data = base()
    policy = {"name": "shared", "document": POLICY}
    data["targets"][0].update(group="g", policy=policy)
    data["targets"].append(second_target(group="g", policy=copy.deepcopy(policy)))

    settings = load(tmp_path, data)

    assert settings.targets[0].policy == settings.targets[1].policy


# --- unknown keys ----------------------------------------------------------------------------


def test_unknown_top_level_key_is_named_with_the_valid_keys(tmp_path: Path) -> None:
    data = base()
    data["wokers"] = 3

    error = rejected(tmp_path, data)

    assert error.path == "wokers"
    assert error.message.startswith("unknown key 'wokers' (did you mean 'workers'?)")
    assert "valid keys here: eim, vault, defaults, targets, workers, metrics, logging" in str(error)
    assert "source" not in error.message


@pytest.mark.parametrize(
    ("dotted", "path", "suggestion"),
    [
        ("vault.auth.tokenfile", "vault.auth.tokenfile", "token_file"),
        ("targets.0.maxage", "targets[0].maxage", "max_age"),
        ("eim.endpoint_url", "eim.endpoint_url", "endpoint"),
    ],
)
def test_unknown_nested_key_is_named_with_a_suggestion(
    tmp_path: Path, dotted: str, path: str, suggestion: str
) -> None:
    data = base()
    put(data, dotted, "x")

    error = rejected(tmp_path, data)

    assert error.path == path
    assert f"did you mean '{suggestion}'?" in error.message


def test_source_is_not_a_yaml_key(tmp_path: Path) -> None:
    data = base()
    data["source"] = "/elsewhere.yaml"

    error = rejected(tmp_path, data)

    assert (error.path, error.message.split(";")[0]) == ("source", "unknown key 'source'")


# --- file-level problems ---------------------------------------------------------------------


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "rotator.yaml"

    with pytest.raises(errors.ConfigError) as info:
        config.load(missing)

    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


def test_yaml_syntax_error_gives_its_line(tmp_path: Path) -> None:
    text = "vault:\n  address: https://v:8200\ntargets: [\n  - name: x\n"

    error = rejected(tmp_path, text)

    assert "not valid YAML at line" in str(error)
    assert str(tmp_path / "rotator.yaml") in str(error)


def test_a_key_given_twice_is_rejected_with_both_lines(tmp_path: Path) -> None:
    text = yaml.safe_dump(base()) + "defaults:\n  grace: 1h\n  grace: 2h\n"

    error = rejected(tmp_path, text)

    assert "'grace' appears twice" in error.message
    lines = text.splitlines()
    first = lines.index("  grace: 1h") + 1
    assert f"first on line {first}" in error.message
    assert f"line {first + 1}," in error.message


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = (
        "vault: {address: 'https://v:8200'}\n"
        "targets:\n"
        "  - &first {name: a, user: u1, secret_path: a/b, max_age: 7d}\n"
        "  - <<: *first\n    name: b\n    user: u2\n    secret_path: c/d\n"
    )

    first, second = load(tmp_path, text).targets

    assert (second.name, second.user, second.secret_path) == ("b", "u2", "c/d")
    assert second.timing.max_age == first.timing.max_age == timedelta(days=7)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "is empty"), ("# only a comment\n", "is empty"), ("- a\n- b\n", "must hold a mapping")],
)
def test_config_file_that_is_not_a_mapping_is_rejected(
    tmp_path: Path, text: str, fragment: str
) -> None:
    assert fragment in rejected(tmp_path, text).message


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    text = "workers: !!python/object/apply:os.system ['true']\n"

    assert "not valid YAML" in rejected(tmp_path, text).message


# --- durations -------------------------------------------------------------------------------


GOOD_DURATIONS = [
    ("500ms", timedelta(milliseconds=500)),
    ("90s", timedelta(seconds=90)),
    ("15m", timedelta(minutes=15)),
    ("24h", timedelta(hours=24)),
    ("30d", timedelta(days=30)),
    ("4w", timedelta(weeks=4)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1w2d3h4m5s6ms", timedelta(weeks=1, days=2, hours=3, minutes=4, seconds=5, milliseconds=6)),
    ("1s500ms", timedelta(seconds=1, milliseconds=500)),
    (" 5m ", timedelta(minutes=5)),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_DURATIONS)
def test_duration_text_parses(text: str, expected: timedelta) -> None:
    assert config.parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "90", "1.5h", "h", "5x", "30m1h", "1h1h", "-5m", "5 m", "1H", "ms", "1hour"]
)
def test_bad_duration_text_is_rejected_with_the_hint(text: str) -> None:
    with pytest.raises(ValueError, match="use a number with a unit") as info:
        config.parse_duration(text)

    assert f"invalid duration '{text}'" in str(info.value)


@pytest.mark.parametrize("text", ["0s", "0ms", "0d0h"])
def test_zero_duration_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="must be greater than zero"):
        config.parse_duration(text)


def test_bare_number_in_yaml_is_rejected_with_the_exact_hint(tmp_path: Path) -> None:
    data = base()
    data["defaults"] = {"grace": 90}

    error = rejected(tmp_path, data)

    assert str(error) == (
        "defaults.grace: invalid duration '90': use a number with a unit (ms, s, m, h, d, w), "
        "for example 90s or 1h30m"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(seconds=5400), "1h30m"),
        (timedelta(hours=24), "1d"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(days=30), "30d"),
        (timedelta(weeks=4), "28d"),
        (timedelta(days=1, milliseconds=1), "1d1ms"),
        (timedelta(0), "0s"),
        (timedelta(minutes=-5), "-5m"),
    ],
)
def test_duration_formats_canonically(value: timedelta, text: str) -> None:
    assert config.format_duration(value) == text


@pytest.mark.parametrize(("text", "expected"), GOOD_DURATIONS)
def test_formatted_duration_parses_back_to_the_same_value(text: str, expected: timedelta) -> None:
    assert config.parse_duration(config.format_duration(expected)) == expected


def test_durations_serialise_as_their_canonical_text(tmp_path: Path) -> None:
    dumped = load(tmp_path, base()).defaults.model_dump(mode="json")

    assert dumped["max_age"] == "30d"
    assert dumped["check_interval"] == "5m"


# --- policy documents ------------------------------------------------------------------------


def test_relative_document_file_is_resolved_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc" / "rotator"
    (config_dir / "policies").mkdir(parents=True)
    (config_dir / "policies" / "p.json").write_text(json.dumps(POLICY))
    data = base()
    data["targets"][0].update(group="g", policy={"name": "p", "document_file": "policies/p.json"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    settings = config.load(write(config_dir, data))

    policy = settings.targets[0].policy
    assert policy is not None
    assert policy.document_file == config_dir / "policies" / "p.json"
    assert policy.document == POLICY


def test_inline_document_is_used_as_given(tmp_path: Path) -> None:
    data = base()
    single = {"Statement": {"Effect": "Allow", "NotAction": "iam:*"}}
    data["targets"][0].update(group="g", policy={"name": "p", "document": single})

    policy = load(tmp_path, data).targets[0].policy

    assert policy is not None
    assert policy.document == single
    assert policy.document_file is None
    assert policy.canonical_document() == json.dumps(single, sort_keys=True, separators=(",", ":"))


def test_missing_policy_file_is_named_with_its_absolute_path(tmp_path: Path) -> None:
    data = base()
    data["targets"][0].update(group="g", policy={"name": "p", "document_file": "nope.json"})

    error = rejected(tmp_path, data)

    assert error.path == "targets[0].policy.document_file"
    assert str(tmp_path / "nope.json") in error.message
    assert "relative to the config file's directory" in error.message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"Statement": [}', "not valid JSON: Expecting value at line 1, column 16"),
        ('{"Statement": [], "x": NaN}', "not valid JSON"),
        ('[{"Statement": []}]', "must hold a JSON object"),
        ('{"Version": "2012-10-17"}', "no Statement"),
    ],
)
def test_invalid_policy_file_is_rejected(tmp_path: Path, content: str, fragment: str) -> None:
    (tmp_path / "p.json").write_text(content)
    data = base()
    data["targets"][0].update(group="g", policy={"name": "p", "document_file": "p.json"})

    error = rejected(tmp_path, data)

    assert error.path == "targets[0].policy.document_file"
    assert fragment in error.message


def test_unquoted_date_in_an_inline_document_asks_for_quotes(tmp_path: Path) -> None:
    text = (
        "vault: {address: 'https://v:8200'}\n"
        "targets:\n"
        "  - name: t\n    user: u\n    secret_path: a/b\n    group: g\n"
        "    policy:\n      name: p\n      document:\n        Version: 2012-10-17\n"
        "        Statement: [{Effect: Allow, Action: '*'}]\n"
    )

    error = rejected(tmp_path, text)

    assert error.path == "targets[0].policy.document"
    assert "Version is a date in YAML: quote it" in error.message


def test_document_of_exactly_the_eim_limit_is_accepted(tmp_path: Path) -> None:
    document: dict[str, Any] = {"Statement": [{"Effect": "Allow", "Action": ""}]}
    padding = config.POLICY_MAX_CHARS - len(json.dumps(document, separators=(",", ":")))
    document["Statement"][0]["Action"] = "a" * padding
    data = base()
    data["targets"][0].update(group="g", policy={"name": "p", "document": document})

    assert load(tmp_path, data).targets[0].policy is not None
    document["Statement"][0]["Action"] += "a"
    assert "at most 5120" in rejected(tmp_path, data).message


# --- endpoint, listen, Vault address ---------------------------------------------------------


@pytest.mark.parametrize(
    ("eim", "expected"),
    [
        ({}, "https://eim.eu-west-2.outscale.com"),
        ({"region": "cloudgouv-eu-west-1"}, "https://eim.cloudgouv-eu-west-1.outscale.com"),
        ({"endpoint": "http://127.0.0.1:5055"}, "http://127.0.0.1:5055"),
        ({"provider": "aws"}, None),
        ({"provider": "aws", "endpoint": "https://iam.example"}, "https://iam.example"),
    ],
)
def test_eim_endpoint_is_derived_from_provider_and_region(
    tmp_path: Path, eim: dict[str, Any], expected: str | None
) -> None:
    data = base()
    data["eim"] = eim

    assert load(tmp_path, data).eim.endpoint_url == expected


def test_url_with_credentials_is_rejected_without_echoing_them(tmp_path: Path) -> None:
    data = base()
    data["vault"]["address"] = "https://admin:hunter2-password@vault.example"

    error = rejected(tmp_path, data)

    assert error.path == "vault.address"
    assert "hunter2" not in str(error)


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("eim.endpoint", "https://eim.example/?key=abc-secret-1234"),
        ("eim.endpoint", "https://eim.example:8443?key=abc-secret-1234"),
        ("eim.endpoint", "https://eim.example/#abc-secret-1234"),
        ("vault.address", "https://vault.example:8200/?token=abc-secret-1234"),
        ("vault.address", "ftp://vault.example:99999/?token=abc-secret-1234"),  # other faults too
    ],
)
def test_url_with_a_query_or_fragment_is_rejected_without_echoing_it(
    tmp_path: Path, key: str, url: str
) -> None:
    data = base()
    put(data, key, url)

    error = rejected(tmp_path, data)

    assert error.path == key
    assert "abc-secret-1234" not in str(error)
    assert "query ('?...') or a fragment ('#...')" in error.message
    assert "remove it" in error.message
    assert url.partition("/?")[0].partition("?")[0].partition("/#")[0] in error.message


@pytest.mark.parametrize("url", ["https://vault.example:8200/?", "https://vault.example:8200#"])
def test_url_with_an_empty_query_or_fragment_is_rejected(tmp_path: Path, url: str) -> None:
    data = base()
    data["vault"]["address"] = url

    assert "query ('?...') or a fragment" in rejected(tmp_path, data).message


def test_vault_addr_with_a_query_is_rejected_without_echoing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_ADDR", "https://vault.example:8200/?token=abc-secret-1234")
    data = base()
    del data["vault"]["address"]

    error = rejected(tmp_path, data)

    assert error.path == "vault.address"
    assert "abc-secret-1234" not in str(error)
    assert "(taken from VAULT_ADDR)" in error.message


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("0.0.0.0:9109", "0.0.0.0", 9109),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("[::1]:9109", "::1", 9109),
        ("[::]:65535", "::", 65535),
        ("localhost:9109", "localhost", 9109),
        ("metrics.internal.example:80", "metrics.internal.example", 80),
    ],
)
def test_listen_address_is_parsed_into_host_and_port(
    tmp_path: Path, listen: str, host: str, port: int
) -> None:
    data = base()
    data["metrics"] = {"listen": listen}

    metrics = load(tmp_path, data).metrics

    assert (metrics.host, metrics.port) == (host, port)


@pytest.mark.parametrize(
    "listen",
    [
        "9109",
        "::1:9109",
        ":9109",
        "host:65536",
        "host:port",
        "host:",
        "[::1]9109",
        "[x]:80",
        "a_b:80",
        "300.1.1.1:80",
        "10.0.0:80",
    ],
)
def test_bad_listen_address_is_rejected(tmp_path: Path, listen: str) -> None:
    data = base()
    data["metrics"] = {"listen": listen}

    error = rejected(tmp_path, data)

    assert error.path == "metrics.listen"
    assert f"invalid listen address '{listen}'" in error.message


def test_vault_address_falls_back_to_vault_addr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_ADDR", "https://from-env:8200")
    data = base()
    del data["vault"]

    assert load(tmp_path, data).vault.address == "https://from-env:8200"


def test_vault_address_in_the_file_wins_over_vault_addr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_ADDR", "https://from-env:8200")

    assert load(tmp_path, base()).vault.address == "https://vault.example:8200"


def test_no_vault_address_anywhere_is_rejected(tmp_path: Path) -> None:
    data = base()
    data["vault"] = {"mount": "kv"}

    error = rejected(tmp_path, data)

    assert str(error) == "vault.address: no Vault address: set vault.address or VAULT_ADDR"


def test_invalid_vault_addr_says_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_ADDR", "vault:8200")
    data = base()
    data["vault"] = {}

    error = rejected(tmp_path, data)

    assert error.path == "vault.address"
    assert "(taken from VAULT_ADDR)" in error.message


# --- paths -----------------------------------------------------------------------------------


def test_relative_file_settings_are_stored_absolute_against_the_config_directory(
    tmp_path: Path,
) -> None:
    data = base()
    data["eim"] = {"credentials_file": "secrets/eim"}
    data["vault"].update(
        ca_file="ca.pem",
        auth={
            "method": "approle",
            "token_file": "tok",
            "approle": {"role_id": "r", "secret_id_file": "sid"},
            "kubernetes": {"role": "k", "token_file": "k8s-token"},
        },
    )
    config_dir = tmp_path / "conf"

    settings = config.load(write(config_dir, data))

    auth = settings.vault.auth
    assert auth.approle is not None
    assert auth.kubernetes is not None
    assert settings.eim.credentials_file == config_dir / "secrets" / "eim"
    assert settings.vault.ca_file == config_dir / "ca.pem"
    assert auth.token_file == config_dir / "tok"
    assert auth.approle.secret_id_file == config_dir / "sid"
    assert auth.approle.mount == "approle"
    assert auth.kubernetes.token_file == config_dir / "k8s-token"


def test_kubernetes_auth_defaults_to_the_service_account_token(tmp_path: Path) -> None:
    data = base()
    data["vault"]["auth"] = {"method": "kubernetes", "kubernetes": {"role": "rotator"}}

    kubernetes = load(tmp_path, data).vault.auth.kubernetes

    assert kubernetes is not None
    assert kubernetes.token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    assert kubernetes.mount == "kubernetes"


# --- secret files read at use time -----------------------------------------------------------


def eim_settings(tmp_path: Path, content: str | None) -> config.EimSettings:
    data = base()
    data["eim"] = {"credentials_file": "eim-credentials"}
    if content is not None:
        (tmp_path / "eim-credentials").write_text(content)
    return load(tmp_path, data).eim


def test_eim_credentials_file_is_parsed_like_the_aws_shared_file(tmp_path: Path) -> None:
    content = (
        "# rotator's own key\n[default]\naws_access_key_id = AKIAEXAMPLE\n"
        f"; another comment\naws_secret_access_key={SECRET}  \nregion = eu-west-2\n"
    )

    credentials = config.read_eim_credentials(eim_settings(tmp_path, content))

    assert credentials is not None
    key_id, secret = credentials
    assert key_id == "AKIAEXAMPLE"
    assert secret.reveal() == SECRET
    assert SECRET not in repr(credentials)


def test_eim_credentials_file_is_read_at_use_not_at_load(tmp_path: Path) -> None:
    settings = eim_settings(tmp_path, None)  # loads although the file does not exist yet
    (tmp_path / "eim-credentials").write_text(
        f"aws_access_key_id = AKIA1\naws_secret_access_key = {SECRET}\n"
    )

    assert config.read_eim_credentials(settings) is not None
    (tmp_path / "eim-credentials").write_text(
        "aws_access_key_id = AKIA2\naws_secret_access_key = rotated-secret-value\n"
    )
    credentials = config.read_eim_credentials(settings)
    assert credentials is not None
    assert credentials[0] == "AKIA2"


def test_no_credentials_file_means_the_standard_boto3_chain(tmp_path: Path) -> None:
    assert config.read_eim_credentials(load(tmp_path, base()).eim) is None


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (f"aws_secret_access_key = {SECRET}\n", "has no aws_access_key_id"),
        ("aws_access_key_id = AKIA1\n", "has no aws_secret_access_key"),
        ("aws_access_key_id = AKIA1\naws_secret_access_key =\n", "has no aws_secret_access_key"),
        ("aws_access_key_id = A\naws_access_key_id = B\n", "aws_access_key_id appears twice"),
        (f"aws_access_key_id = AKIA1\naws_secret_access_key: {SECRET}\n", "line 2 of"),
        (f"aws_access_key_id = AKIA1\n{SECRET}\n", "is not 'name = value'"),
        # quoted or commented, accepted here then refused by EIM as a bad key (breaker c15)
        (f'aws_access_key_id = AKIA1\naws_secret_access_key = "{SECRET}"\n', "in quotes"),
        (f"aws_access_key_id = 'AKIA1'\naws_secret_access_key = {SECRET}\n", "in quotes"),
        (
            f"aws_access_key_id = AKIA1\naws_secret_access_key = {SECRET} # ops\n",
            "the aws_secret_access_key of",
        ),
    ],
)
def test_bad_eim_credentials_file_is_named_without_showing_the_secret(
    tmp_path: Path, content: str, fragment: str
) -> None:
    settings = eim_settings(tmp_path, content)

    with pytest.raises(errors.ConfigError) as info:
        config.read_eim_credentials(settings)

    assert info.value.path == "eim.credentials_file"
    assert fragment in info.value.message
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_missing_eim_credentials_file_is_named(tmp_path: Path) -> None:
    settings = eim_settings(tmp_path, None)

    with pytest.raises(errors.ConfigError) as info:
        config.read_eim_credentials(settings)

    assert info.value.path == "eim.credentials_file"
    assert str(tmp_path / "eim-credentials") in info.value.message


def vault_settings(tmp_path: Path, **auth: Any) -> config.VaultSettings:
    data = base()
    data["vault"]["auth"] = auth
    return load(tmp_path, data).vault


def test_vault_token_comes_from_vault_token_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("hvs.from-the-file-0001\n")
    settings = vault_settings(tmp_path, token_file="token")

    assert config.read_vault_token(settings).reveal() == "hvs.from-the-file-0001"
    monkeypatch.setenv("VAULT_TOKEN", "hvs.from-the-environment")
    assert config.read_vault_token(settings).reveal() == "hvs.from-the-environment"


def test_no_vault_token_anywhere_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError) as info:
        config.read_vault_token(vault_settings(tmp_path))

    assert str(info.value) == (
        "vault.auth.token_file: no Vault token: set VAULT_TOKEN or vault.auth.token_file"
    )


def test_vault_token_is_not_read_for_login_methods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "hvs.ignored")
    settings = vault_settings(
        tmp_path, method="approle", approle={"role_id": "r", "secret_id_file": "sid"}
    )

    with pytest.raises(errors.ConfigError) as info:
        config.read_vault_token(settings)

    assert info.value.path == "vault.auth.method"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("hvs.the-token-0001\n# rotated by ops\n", "holds more than the secret"),
        ("hvs.the-token-0001 hvs.the-token-0002\n", "holds more than the secret"),
        ('"hvs.the-token-0001"\n', "holds the secret in quotes"),
    ],
)
def test_a_secret_file_holding_more_than_the_secret_is_refused_without_showing_it(
    tmp_path: Path, content: str, fragment: str
) -> None:
    # sent as it was, a second line made Vault's client fail with InvalidHeader, reported as
    # Vault unreachable: "check the network" (breaker c16)
    (tmp_path / "token").write_text(content)

    with pytest.raises(errors.ConfigError) as info:
        config.read_secret_file(tmp_path / "token", "vault.auth.token_file")

    assert info.value.path == "vault.auth.token_file"
    assert fragment in info.value.message
    assert "the-token" not in str(info.value)


def test_empty_secret_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  \n")

    with pytest.raises(errors.ConfigError) as info:
        config.read_secret_file(tmp_path / "token", "vault.auth.token_file")

    assert info.value.path == "vault.auth.token_file"
    assert "is empty" in info.value.message


def test_secret_file_that_is_not_text_is_rejected_without_its_bytes(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"\xffsecret-bytes-here")

    with pytest.raises(errors.ConfigError) as info:
        config.read_secret_file(tmp_path / "token", "vault.auth.approle.secret_id_file")

    assert "not UTF-8" in info.value.message
    assert "secret-bytes" not in str(info.value)


def test_credential_prefix_reads_from_the_systemd_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "run" / "credentials"
    credentials.mkdir(parents=True)
    (credentials / "vault-token").write_text("hvs.systemd-credential\n")
    (credentials / "eim-credentials").write_text(
        f"aws_access_key_id = AKIASYSTEMD\naws_secret_access_key = {SECRET}\n"
    )
    data = base()
    data["eim"] = {"credentials_file": "credential:eim-credentials"}
    data["vault"]["auth"] = {"token_file": "credential:vault-token"}
    settings = load(tmp_path, data)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    assert config.read_vault_token(settings.vault).reveal() == "hvs.systemd-credential"
    eim = config.read_eim_credentials(settings.eim)
    assert eim is not None
    assert eim[0] == "AKIASYSTEMD"
    assert config.resolve_file("credential:ca.pem", "vault.ca_file") == credentials / "ca.pem"


def test_credential_prefix_without_credentials_directory_says_what_to_do(
    tmp_path: Path,
) -> None:
    settings = vault_settings(tmp_path, token_file="credential:vault-token")

    with pytest.raises(errors.ConfigError) as info:
        config.read_vault_token(settings)

    assert info.value.path == "vault.auth.token_file"
    assert "CREDENTIALS_DIRECTORY is not set" in info.value.message
    assert "LoadCredential=vault-token:" in info.value.message
    assert "sudo CREDENTIALS_DIRECTORY=/etc/rotator/secrets rotator" in info.value.message


@pytest.mark.parametrize(
    ("token_file", "env", "fix"),
    [
        ("token", "", "write it to {tmp}/token (re-read without a restart)"),
        ("credential:vault-token", "", "LoadCredential=vault-token:<file> names, then restart"),
        ("token", "hvs.from-env", "set VAULT_TOKEN to it in rotator's environment, restart"),
    ],
)
def test_the_fix_for_a_refused_token_is_the_way_its_token_came(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token_file: str, env: str, fix: str
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", env)
    settings = vault_settings(tmp_path, token_file=token_file)

    said = config.vault_token_fix(settings)

    assert fix.format(tmp=tmp_path) in said
    assert ("without a restart" in said) == (token_file == "token" and not env)


def test_document_file_may_be_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "policy").write_text(json.dumps(POLICY))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    data = base()
    data["targets"][0].update(group="g", policy={"name": "p", "document_file": "credential:policy"})

    policy = load(tmp_path, data).targets[0].policy

    assert policy is not None
    assert policy.document == POLICY


# --- files that are not regular files --------------------------------------------------------
# Opening a FIFO for reading waits for a writer: check-config and run hung for ever on one.
# Every file rotator reads is refused, naming its key, before it is opened; the timeouts make a
# regression fail instead of hang.


def make_fifo(directory: Path, name: str) -> Path:
    path = directory / name
    os.mkfifo(path)
    return path


def assert_names_fifo(error: errors.ConfigError, key: str, file: Path) -> None:
    assert error.path == key
    assert f"{file} is a FIFO (named pipe), not a regular file" in error.message


@pytest.mark.timeout(10)
def test_a_config_file_that_is_a_fifo_is_refused_naming_it(tmp_path: Path) -> None:
    path = make_fifo(tmp_path, "rotator.yaml")

    with pytest.raises(errors.ConfigError) as info:
        config.load(path)

    assert_names_fifo(info.value, "", path)
    assert "give the path of the rotator's YAML config" in info.value.message


@pytest.mark.timeout(10)
def test_a_config_file_that_is_a_directory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError) as info:
        config.load(tmp_path)

    assert info.value.path == ""
    assert f"config file {tmp_path} is a directory, not a regular file" in info.value.message


SECRET_FILE_KEYS: list[tuple[str, dict[str, Any], Callable[[config.Settings], object]]] = [
    (
        "eim.credentials_file",
        {"eim": {"credentials_file": "fifo"}},
        lambda s: config.read_eim_credentials(s.eim),
    ),
    (
        "vault.auth.token_file",
        {"vault.auth": {"token_file": "fifo"}},
        lambda s: config.read_vault_token(s.vault),
    ),
    (
        "vault.auth.approle.secret_id_file",
        {
            "vault.auth.method": "approle",
            "vault.auth.approle": {"role_id": "r", "secret_id_file": "fifo"},
        },
        lambda s: config.read_secret_file(
            typing.cast(config.AppRoleSettings, s.vault.auth.approle).secret_id_file,
            "vault.auth.approle.secret_id_file",
        ),
    ),
    (
        "vault.auth.kubernetes.token_file",
        {
            "vault.auth.method": "kubernetes",
            "vault.auth.kubernetes": {"role": "r", "token_file": "fifo"},
        },
        lambda s: config.read_secret_file(
            typing.cast(config.KubernetesAuthSettings, s.vault.auth.kubernetes).token_file,
            "vault.auth.kubernetes.token_file",
        ),
    ),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("key", "settings", "read"), SECRET_FILE_KEYS, ids=[key for key, _, _ in SECRET_FILE_KEYS]
)
def test_a_secret_file_that_is_a_fifo_is_refused_naming_its_key(
    tmp_path: Path,
    key: str,
    settings: dict[str, Any],
    read: Callable[[config.Settings], object],
) -> None:
    path = make_fifo(tmp_path, "fifo")
    data = base()
    for dotted, value in settings.items():
        put(data, dotted, value)
    loaded = load(tmp_path, data)  # loads: secret files are read at use

    with pytest.raises(errors.ConfigError) as info:
        read(loaded)

    assert_names_fifo(info.value, key, path)
    assert "give the file that holds only the secret" in info.value.message


@pytest.mark.timeout(10)
def test_a_policy_document_file_that_is_a_fifo_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = make_fifo(tmp_path, "policy.json")
    data = base()
    _policy_target(data, {"document_file": "policy.json"})

    error = rejected(tmp_path, data)

    assert_names_fifo(error, "targets[0].policy.document_file", path)


@pytest.mark.timeout(10)
def test_a_systemd_credential_that_is_a_fifo_is_refused_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    path = make_fifo(credentials, "vault-token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = vault_settings(tmp_path, token_file="credential:vault-token")

    with pytest.raises(errors.ConfigError) as info:
        config.read_vault_token(settings)

    assert_names_fifo(info.value, "vault.auth.token_file", path)


@pytest.mark.timeout(10)
def test_a_symlink_to_a_fifo_is_refused_naming_the_link(tmp_path: Path) -> None:
    make_fifo(tmp_path, "fifo")
    (tmp_path / "token").symlink_to(tmp_path / "fifo")

    with pytest.raises(errors.ConfigError) as info:
        config.read_secret_file(tmp_path / "token", "vault.auth.token_file")

    assert_names_fifo(info.value, "vault.auth.token_file", tmp_path / "token")


@pytest.mark.timeout(10)
def test_a_file_swapped_for_a_fifo_after_its_check_is_refused_without_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name is checked, then opened: a FIFO put in its place in between must not block the
    # open either. os.stat answering for a regular file stands for the swap.
    (tmp_path / "regular").write_text("hvs.token\n")
    path = make_fifo(tmp_path, "fifo")
    real_stat = os.stat

    def stat_of_the_regular_file(*_: Any, **__: Any) -> os.stat_result:
        return real_stat(tmp_path / "regular")

    monkeypatch.setattr(os, "stat", stat_of_the_regular_file)
    with pytest.raises(errors.ConfigError) as info:
        config.read_secret_file(path, "vault.auth.token_file")
    monkeypatch.undo()

    assert_names_fifo(info.value, "vault.auth.token_file", path)


def test_symlinks_to_regular_files_are_read_as_the_files(tmp_path: Path) -> None:
    # A Kubernetes ConfigMap or Secret mounts each file as a symlink into ..data/.
    real = tmp_path / "..data"
    real.mkdir()
    (real / "token").write_text("hvs.from-a-symlink\n")
    (real / "policy.json").write_text(json.dumps(POLICY))
    data = base()
    _policy_target(data, {"document_file": "policy.json"})
    data["vault"]["auth"] = {"token_file": "token"}
    (real / "rotator.yaml").write_text(yaml.safe_dump(data))
    for name in ("token", "policy.json", "rotator.yaml"):
        (tmp_path / name).symlink_to(real / name)

    settings = config.load(tmp_path / "rotator.yaml")

    assert config.read_vault_token(settings.vault).reveal() == "hvs.from-a-symlink"
    policy = settings.targets[0].policy
    assert policy is not None and policy.document == POLICY


# --- immutability and secrecy ----------------------------------------------------------------


def test_settings_are_frozen_all_the_way_down(tmp_path: Path) -> None:
    settings = load(tmp_path, base())

    with pytest.raises(pydantic.ValidationError):
        settings.workers = 8
    with pytest.raises(pydantic.ValidationError):
        settings.defaults.max_age = timedelta(days=1)
    with pytest.raises(pydantic.ValidationError):
        settings.targets[0].name = "other"
    assert isinstance(settings.targets, tuple)
    assert hash(settings) == hash(load(tmp_path, base()))


def test_settings_built_from_target_objects_do_not_alter_them() -> None:
    target = config.Target(name="t", user="u", secret_path="p")

    settings = config.Settings(
        vault=config.VaultSettings(address="https://v:8200"),
        defaults=config.Timing(grace=timedelta(hours=1)),
        targets=(target,),
        source=Path("/etc/rotator/rotator.yaml"),
    )

    assert settings.targets[0].timing.grace == timedelta(hours=1)
    assert target.timing.grace == timedelta(hours=24)


def test_repr_of_settings_never_holds_a_secret_read_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text(SECRET)
    (tmp_path / "eim").write_text(f"aws_access_key_id = AKIA1\naws_secret_access_key = {SECRET}\n")
    data = base()
    data["eim"] = {"credentials_file": "eim"}
    data["vault"]["auth"] = {"token_file": "token"}
    settings = load(tmp_path, data)

    token = config.read_vault_token(settings.vault)
    credentials = config.read_eim_credentials(settings.eim)

    assert token.reveal() == SECRET
    assert credentials is not None
    for text in (repr(settings), str(settings), repr(token), repr(credentials)):
        assert SECRET not in text
    assert SECRET in model.Secret.known_values()


def test_config_module_imports_no_client_library() -> None:
    source = Path(config.__file__).read_text()

    for library in ("boto3", "botocore", "hvac", "apscheduler", "prometheus_client"):
        assert f"import {library}" not in source
        assert f"from {library}" not in source


def test_format_key_path_writes_indexes_in_brackets() -> None:
    assert config.format_key_path(("targets", 0, "policy", "name")) == "targets[0].policy.name"
    assert config.format_key_path(()) == ""


def test_a_typo_in_a_required_key_names_the_typo_not_the_missing_key(tmp_path: Path) -> None:
    data = base()
    data["targets"][0]["secretpath"] = data["targets"][0].pop("secret_path")
    error = rejected(tmp_path, data)
    assert error.path == "targets[0].secretpath"
    assert "did you mean 'secret_path'" in error.message


# --- bounds: what would overflow, recurse or hang later is refused at load -------------------


def _duration_keys(model: type[pydantic.BaseModel], prefix: str) -> list[str]:
    """Every duration key under ``model``, as a dotted path (``targets.0`` for list items)."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if "timedelta" in str(field.annotation):
            keys.append(path)
        nested = config._model_in(field.annotation)
        if nested is not None:
            keys += _duration_keys(nested, f"{path}.0" if name == "targets" else path)
    return keys


DURATION_KEYS = _duration_keys(config.Settings, "")


def test_every_duration_key_is_found_for_the_bound_tests() -> None:
    assert {"eim.read_timeout", "vault.lock_ttl", "vault.timeout"} <= set(DURATION_KEYS)
    assert {f"defaults.{k}" for k in ("check_interval", "max_age", "identity_check_interval")} <= (
        set(DURATION_KEYS)
    )
    assert "targets.0.inactive_period" in DURATION_KEYS
    assert len(DURATION_KEYS) == 4 + 2 * 6  # eim 2, vault 2, six timing keys twice


@pytest.mark.parametrize("text", ["99999999999d", "1000000000d", "3651d", "9" * 5000 + "ms"])
@pytest.mark.parametrize("dotted", DURATION_KEYS)
def test_every_duration_key_refuses_more_than_ten_years_naming_the_key(
    tmp_path: Path, dotted: str, text: str
) -> None:
    data = base()
    put(data, dotted, text)

    error = rejected(tmp_path, data)

    assert error.path == dotted.replace(".0.", "[0].")
    assert "too long: use at most 3650d (10 years)" in error.message
    assert len(error.message) < 200


def test_ten_years_is_the_longest_duration_and_dates_stay_in_range(tmp_path: Path) -> None:
    data = base()
    data["defaults"] = {"max_age": "3650d", "max_keys": 100}

    timing = load(tmp_path, data).targets[0].timing

    assert config.parse_duration("3650d") == config.MAX_DURATION == timedelta(days=3650)
    assert config.parse_duration("520w") == timedelta(weeks=520)
    assert timing.max_age == timedelta(days=3650)
    # the furthest date the slot rule and the engine compute is far from datetime's end
    assert datetime(2100, 1, 1, tzinfo=UTC) + 99 * timing.max_age < datetime.max.replace(tzinfo=UTC)


def test_a_duration_object_longer_than_ten_years_is_refused_too() -> None:
    with pytest.raises(pydantic.ValidationError, match="at most 3650d"):
        config.Timing(max_age=timedelta(days=3651))


@pytest.mark.parametrize(
    ("dotted", "value", "fragment"),
    [
        ("defaults.max_keys", 99999999999999999999999, "at most 100"),
        ("targets.0.max_keys", 101, "at most 100"),
        ("workers", 99999999999999999999999, "less than or equal to 64"),
        ("eim.max_attempts", 99999999999999999999999, "less than or equal to 20"),
    ],
)
def test_huge_whole_numbers_are_refused_naming_the_key(
    tmp_path: Path, dotted: str, value: int, fragment: str
) -> None:
    data = base()
    put(data, dotted, value)

    error = rejected(tmp_path, data)

    assert error.path == dotted.replace(".0.", "[0].")
    assert fragment in error.message


def test_a_number_too_long_for_python_is_a_yaml_error_with_its_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(base()) + "workers: " + "9" * 5000 + "\n"

    error = rejected(tmp_path, text)

    assert "is a number too long to read: shorten it" in error.message
    assert "line " in error.message and len(error.message) < 300


def test_an_impossible_unquoted_date_is_a_yaml_error_with_its_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(base()) + "defaults: {max_age: 2024-02-30}\n"

    error = rejected(tmp_path, text)

    assert "'2024-02-30' is not a valid date" in error.message
    assert "quote it" in error.message and f"line {len(text.splitlines())}," in error.message


def _policy_target(data: dict[str, Any], policy: dict[str, Any]) -> None:
    data["targets"][0].update(group="g", policy={"name": "p", **policy})


@pytest.mark.parametrize("depth", [100, 2000])
def test_a_policy_file_nested_too_deeply_is_refused_naming_document_file(
    tmp_path: Path, depth: int
) -> None:
    (tmp_path / "deep.json").write_text('{"Statement": ' + "[" * depth + "]" * depth + "}")
    data = base()
    _policy_target(data, {"document_file": "deep.json"})

    error = rejected(tmp_path, data)

    assert error.path == "targets[0].policy.document_file"
    assert "nested too deeply" in error.message


def test_an_inline_policy_nested_too_deeply_is_refused_naming_document(tmp_path: Path) -> None:
    nested: Any = ["ec2:Describe*"]
    for _ in range(40):
        nested = [nested]
    data = base()
    _policy_target(data, {"document": {"Statement": nested}})

    error = rejected(tmp_path, data)

    assert error.path == "targets[0].policy.document"
    assert "nested too deeply" in error.message


@pytest.mark.timeout(10)
def test_a_policy_file_that_never_ends_is_refused_as_not_a_regular_file(tmp_path: Path) -> None:
    data = base()
    _policy_target(data, {"document_file": "/dev/zero"})

    error = rejected(tmp_path, data)

    assert error.path == "targets[0].policy.document_file"
    assert "/dev/zero is a character device, not a regular file" in error.message


@pytest.mark.timeout(10)
def test_a_huge_policy_file_is_refused_as_too_long(tmp_path: Path) -> None:
    with (tmp_path / "huge.json").open("wb") as stream:
        stream.truncate(10 * 1024 * 1024)  # sparse: ten megabytes of NUL, written in no time
    data = base()
    _policy_target(data, {"document_file": "huge.json"})

    error = rejected(tmp_path, data)

    assert error.path == "targets[0].policy.document_file"
    assert "huge.json is too long" in error.message and "5120" in error.message


def test_a_pretty_printed_policy_file_within_the_eim_limit_is_accepted(tmp_path: Path) -> None:
    document = {
        "Statement": [{"Effect": "Allow", "Action": [f"ec2:Describe{i:04}" for i in range(200)]}]
    }
    text = json.dumps(document, indent=40)
    assert len(text) > 5120 * 2 and len(json.dumps(document, separators=(",", ":"))) < 5120
    (tmp_path / "p.json").write_text(text)
    data = base()
    _policy_target(data, {"document_file": "p.json"})

    policy = load(tmp_path, data).targets[0].policy

    assert policy is not None and policy.document == document


@pytest.mark.timeout(10)
def test_a_config_file_that_never_ends_is_refused_as_not_a_regular_file() -> None:
    with pytest.raises(errors.ConfigError, match="/dev/zero is a character device, not a regular"):
        config.load("/dev/zero")


@pytest.mark.timeout(10)
def test_a_huge_config_file_is_refused_as_too_long(tmp_path: Path) -> None:
    with (tmp_path / "huge.yaml").open("wb") as stream:
        stream.truncate(config.CONFIG_FILE_MAX_CHARS + 1)

    with pytest.raises(errors.ConfigError, match=r"huge\.yaml is longer than 16777216 characters"):
        config.load(tmp_path / "huge.yaml")


@pytest.mark.timeout(10)
def test_a_secret_file_that_never_ends_is_refused_as_not_a_regular_file() -> None:
    with pytest.raises(errors.ConfigError, match="is a character device, not a regular") as info:
        config.read_secret_file("/dev/zero", "vault.auth.token_file")
    assert info.value.path == "vault.auth.token_file"


@pytest.mark.timeout(10)
def test_a_huge_secret_file_is_refused_as_too_long(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("x" * (config.SECRET_FILE_MAX_CHARS + 1))

    with pytest.raises(errors.ConfigError, match="longer than 65536 characters") as info:
        config.read_secret_file(tmp_path / "token", "vault.auth.token_file")
    assert info.value.path == "vault.auth.token_file"


def test_a_region_longer_than_a_dns_label_is_refused(tmp_path: Path) -> None:
    data = base()
    data["eim"] = {"region": "a" * 5000}

    error = rejected(tmp_path, data)

    assert error.path == "eim.region"
    assert "5000 characters long" in error.message and "at most 63" in error.message
    assert len(error.message) < 200  # the value is shortened, not echoed whole


def test_a_region_of_63_characters_is_accepted(tmp_path: Path) -> None:
    data = base()
    data["eim"] = {"region": "cloudgouv-eu-west-1" + "-a" * 22}

    assert len(load(tmp_path, data).eim.region) == 63


def test_a_missing_ca_file_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError) as info:
        config.check_ca_file(tmp_path / "nope.pem")

    assert info.value.path == "vault.ca_file"
    assert "does not exist" in info.value.message and "PEM file" in info.value.message


@pytest.mark.timeout(10)
def test_a_ca_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        with pytest.raises(errors.ConfigError, match="not a regular file") as info:
            config.check_ca_file(path)
        assert info.value.path == "vault.ca_file"
        assert str(path) in info.value.message


def test_a_readable_ca_file_or_certificate_directory_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")

    assert config.check_ca_file(tmp_path / "ca.pem") == tmp_path / "ca.pem"
    assert config.check_ca_file(tmp_path) == tmp_path


def test_a_policy_file_with_a_number_too_long_for_python_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(
        '{"Statement": [{"Effect": "Allow", "Action": "*", "X": ' + "9" * 5000 + "}]}"
    )
    data = base()
    _policy_target(data, {"document_file": "p.json"})

    error = rejected(tmp_path, data)

    assert error.path == "targets[0].policy.document_file"
    assert "a number of 5000 digits is too long: shorten it" in error.message
    assert "set_int_max_str_digits" not in error.message


# --- free text that reaches the network; ports; lower bounds ---------------------------------
# Each of these passed check-config and failed only at run (a fuzzer found them): the value ended
# up in an HTTP header, a URL, a request body or the SigV4 scope, or made the daemon useless.


def _is_text(annotation: Any) -> bool:
    """``str``, ``Annotated[str, ...]`` or either one ``| None``."""
    if annotation is str:
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return _is_text(typing.get_args(annotation)[0])
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and (
        len(arguments) == 1 and _is_text(arguments[0])
    )


def _string_keys(model: type[pydantic.BaseModel], prefix: str) -> list[str]:
    """Every plain-string key under ``model`` (Literal choices and file paths excluded)."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if _is_text(field.annotation):
            keys.append(path)
        nested = config._model_in(field.annotation)
        if nested is not None:
            keys += _string_keys(nested, f"{path}.0" if name == "targets" else path)
    return keys


# A valid value of every string key; the tests below spoil it with a control character.
VALID_TEXT: dict[str, str] = {
    "eim.region": "eu-west-2",
    "eim.endpoint": "https://eim.example:443",
    "eim.signing_name": "eim",
    "vault.address": "https://vault.example:8200",
    "vault.auth.approle.role_id": "7d1f7a3c-role",
    "vault.auth.approle.mount": "approle",
    "vault.auth.kubernetes.role": "rotator",
    "vault.auth.kubernetes.mount": "kubernetes",
    "vault.mount": "secret",
    "vault.state_path": "rotator",
    "vault.namespace": "admin/team",
    "targets.0.name": "monitoring",
    "targets.0.user": "watcher_1",
    "targets.0.group": "monitoring",
    "targets.0.policy.name": "monitoring",
    "targets.0.policy.description": "Allow describe for every item",
    "targets.0.policy.path": "/rotator/",
    "targets.0.secret_path": "monitoring/w1",
    "metrics.listen": "[fe80::1%eth0]:9109",
}
# Cron expressions are split on whitespace and rejoined (a trailing newline is normalised away)
# and go to the local scheduler only, never to the network.
NOT_SENT = {"defaults.rotation_window", "targets.0.rotation_window"}


def _with_context(dotted: str) -> dict[str, Any]:
    """``base()`` plus what ``dotted`` needs to be read at all (its auth method, a policy)."""
    data = base()
    if dotted.startswith("vault.auth.approle"):
        put(data, "vault.auth.method", "approle")
        put(data, "vault.auth.approle.role_id", "r")
        put(data, "vault.auth.approle.secret_id_file", "sid")
    if dotted.startswith("vault.auth.kubernetes"):
        put(data, "vault.auth.method", "kubernetes")
        put(data, "vault.auth.kubernetes.role", "r")
    if dotted.startswith("targets.0.policy"):
        put(data, "targets.0.group", "g")
        put(data, "targets.0.policy", {"name": "p", "document": POLICY})
    return data


def test_every_string_key_has_a_valid_sample_for_the_control_character_tests() -> None:
    assert set(_string_keys(config.Settings, "")) - NOT_SENT == set(VALID_TEXT)


@pytest.mark.parametrize("dotted", sorted(VALID_TEXT))
def test_the_valid_sample_of_every_string_key_loads(tmp_path: Path, dotted: str) -> None:
    data = _with_context(dotted)
    put(data, dotted, VALID_TEXT[dotted])

    load(tmp_path, data)


@pytest.mark.parametrize(
    "spoil", ["{}\n", "{}\r\n", "\n{}", "{}\x00", "{}\x1b[2J", "{}\x7f", "{}\x85"]
)
@pytest.mark.parametrize("dotted", sorted(VALID_TEXT))
def test_every_string_key_refuses_control_characters_naming_the_key(
    tmp_path: Path, dotted: str, spoil: str
) -> None:
    data = _with_context(dotted)
    put(data, dotted, spoil.format(VALID_TEXT[dotted]))

    error = rejected(tmp_path, data)

    assert error.path == dotted.replace(".0.", "[0].")
    assert len(error.message) < 300


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("vault.namespace", "admin\nX-Injected: 1"),
        ("vault.namespace", "admin\t"),
        ("vault.auth.approle.role_id", "role\x00id"),
        ("vault.auth.kubernetes.role", "rotator\n"),
        ("targets.0.policy.description", "Allow describe\x07"),
        ("eim.endpoint", "https://eim.example\n"),
        ("vault.address", "https://vault.example:8200\r\n"),
    ],
)
def test_a_control_character_is_named_with_the_fix(tmp_path: Path, dotted: str, value: str) -> None:
    data = _with_context(dotted)
    put(data, dotted, value)

    error = rejected(tmp_path, data)

    assert error.path == dotted.replace(".0.", "[0].")
    assert "control character" in error.message and "remove it" in error.message


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("vault.namespace", " admin"),
        ("vault.namespace", "admin "),
        ("vault.auth.kubernetes.role", " rotator"),
        ("vault.auth.approle.role_id", "role "),
    ],
)
def test_surrounding_whitespace_is_refused_where_it_would_be_sent(
    tmp_path: Path, dotted: str, value: str
) -> None:
    data = _with_context(dotted)
    put(data, dotted, value)

    error = rejected(tmp_path, data)

    assert error.path == dotted
    assert "whitespace" in error.message


def test_a_namespace_outside_ascii_is_refused_as_it_is_an_http_header(tmp_path: Path) -> None:
    data = base()
    put(data, "vault.namespace", "équipe")

    error = rejected(tmp_path, data)

    assert error.path == "vault.namespace"
    assert "X-Vault-Namespace" in error.message and "ASCII" in error.message


@pytest.mark.parametrize("value", ["i am", "iam/eim", "iam;x", "iäm", "iam_x", "-", "a" * 65])
def test_signing_name_is_a_service_name(tmp_path: Path, value: str) -> None:
    data = base()
    put(data, "eim.signing_name", value)

    error = rejected(tmp_path, data)

    assert error.path == "eim.signing_name"
    assert "letters, digits and '-'" in error.message and "iam" in error.message


@pytest.mark.parametrize("value", ["iam", "eim", "execute-api", "IAM2"])
def test_signing_names_of_services_are_accepted(tmp_path: Path, value: str) -> None:
    data = base()
    put(data, "eim.signing_name", value)

    assert load(tmp_path, data).eim.signing_name == value


@pytest.mark.parametrize("value", ["/a b/", "/a\tb/", "/é/"])
def test_policy_path_is_printable_ascii_without_spaces(tmp_path: Path, value: str) -> None:
    data = _with_context("targets.0.policy.path")
    put(data, "targets.0.policy.path", value)

    error = rejected(tmp_path, data)

    assert error.path == "targets[0].policy.path"


@pytest.mark.parametrize("dotted", ["eim.endpoint", "vault.address"])
@pytest.mark.parametrize("url", ["http://127.0.0.1:0", "https://h:00", "http://[::1]:0/v1"])
def test_a_url_with_port_0_is_refused(tmp_path: Path, dotted: str, url: str) -> None:
    data = base()
    put(data, dotted, url)

    error = rejected(tmp_path, data)

    assert error.path == dotted
    assert "port 0" in error.message and "1 to 65535" in error.message


def test_vault_addr_with_port_0_is_refused_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:0")
    data = base()
    del data["vault"]["address"]

    error = rejected(tmp_path, data)

    assert error.path == "vault.address"
    assert "port 0" in error.message and "VAULT_ADDR" in error.message


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "https://h:65535", "https://h"])
def test_ports_from_1_and_default_ports_are_accepted(tmp_path: Path, url: str) -> None:
    data = base()
    put(data, "eim.endpoint", url)

    assert load(tmp_path, data).eim.endpoint == url


LOWER_BOUNDS = [
    ("defaults.check_interval", "1s"),
    ("targets.0.check_interval", "1s"),
    ("vault.lock_ttl", "1s"),
    ("eim.connect_timeout", "100ms"),
    ("eim.read_timeout", "1s"),
    ("vault.timeout", "1s"),
]


@pytest.mark.parametrize(("dotted", "minimum"), LOWER_BOUNDS)
@pytest.mark.parametrize("text", ["1ms", "99ms"])
def test_durations_too_short_to_work_are_refused_saying_the_minimum(
    tmp_path: Path, dotted: str, minimum: str, text: str
) -> None:
    data = base()
    put(data, dotted, text)

    error = rejected(tmp_path, data)

    assert error.path == dotted.replace(".0.", "[0].")
    assert f"too short: use at least {minimum}" in error.message
    assert len(error.message) < 300


@pytest.mark.parametrize(("dotted", "minimum"), LOWER_BOUNDS)
def test_the_minimum_duration_itself_is_accepted(tmp_path: Path, dotted: str, minimum: str) -> None:
    data = base()
    put(data, dotted, minimum)

    load(tmp_path, data)


def test_check_interval_and_lock_ttl_below_a_second_are_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    data = base()
    put(data, "defaults.check_interval", "999ms")
    error = rejected(tmp_path, data)
    assert error.path == "defaults.check_interval" and "IAM" in error.message

    data = base()
    put(data, "vault.lock_ttl", "500ms")
    error = rejected(tmp_path, data)
    assert error.path == "vault.lock_ttl" and "renewed every third" in error.message


def test_check_config_refuses_a_namespace_with_a_newline_in_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rotator import cli

    data = base()
    put(data, "vault.namespace", "admin\nX-Injected: 1")
    path = write(tmp_path, data)

    code = cli.main(["check-config", "--skip-secret-files", "-c", str(path)])

    captured = capsys.readouterr()
    assert code == 2
    output = (captured.out + captured.err).strip()
    assert len(output.splitlines()) == 1
    assert "vault.namespace" in output and "Traceback" not in output
