"""rotator.log: JSON/console output, library logs in the same pipeline, and secret redaction."""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from rotator import log, model

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
# A secret no pattern recognises: only Secret.known_values() can catch it.
PLAIN_SECRET = model.Secret("correct-horse-battery-staple-42")
AWS_SECRET = model.Secret("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
VAULT_TOKEN = "hvs." + "CAESIJx9aBcDeFgHiJkLmNoP"  # hvs. + 24 chars, never wrapped in a Secret
SIGNATURE = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
SIGV4_HEADER = (
    f"Authorization: AWS4-HMAC-SHA256 Credential={KEY_ID}/20250301/eu-west-2/iam/aws4_request, "
    f"SignedHeaders=content-type;host;x-amz-date, Signature={SIGNATURE}"
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    library_levels = {name: logging.getLogger(name).level for name in log.LIBRARY_LOGGERS}
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, lib_level in library_levels.items():
        logging.getLogger(name).setLevel(lib_level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def configure(fmt: str | None = "json", level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    log.configure(format=fmt, level=level, stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def assert_clean(output: str) -> None:
    for leaked in (PLAIN_SECRET.reveal(), AWS_SECRET.reveal(), VAULT_TOKEN, SIGNATURE):
        assert leaked not in output


# --- JSON ------------------------------------------------------------------------------------


def test_json_line_has_event_level_timestamp_and_facts() -> None:
    out = configure()
    log.get_logger("rotator.engine").info("key_rotated", target="monitoring", key_id=KEY_ID, n=2)

    (line,) = lines(out)
    assert line["event"] == "key_rotated"
    assert line["level"] == "info"
    assert line["logger"] == "rotator.engine"
    assert line["target"] == "monitoring"
    assert line["key_id"] == KEY_ID
    assert line["n"] == 2
    assert line["timestamp"].endswith("Z")
    stamp = datetime.fromisoformat(line["timestamp"].removesuffix("Z")).replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_format_none_off_a_terminal_is_json() -> None:
    out = configure(fmt=None)
    log.get_logger().warning("something_odd", detail="x")
    assert lines(out)[0]["event"] == "something_odd"


def test_level_filters_rotator_events() -> None:
    out = configure(level="WARNING")
    logger = log.get_logger("rotator.engine")
    logger.info("hidden_event")
    logger.warning("shown_event")
    assert [line["event"] for line in lines(out)] == ["shown_event"]


def test_library_records_come_out_as_json_with_their_logger_name() -> None:
    out = configure(level="info")
    logging.getLogger("rotator.adapters.vault").info("token %s renewed", "accessor-1")
    (line,) = lines(out)
    assert line["event"] == "token accessor-1 renewed"
    assert line["logger"] == "rotator.adapters.vault"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")


def test_library_records_carry_the_bound_target() -> None:
    out = configure()
    structlog.contextvars.bind_contextvars(target="monitoring")
    logging.getLogger("botocore.endpoint").debug("Sending request")
    assert lines(out)[0]["target"] == "monitoring"


def test_chatty_libraries_default_to_warning_unless_debug() -> None:
    out = configure(level="info")
    logging.getLogger("botocore.endpoint").info("hidden")
    logging.getLogger("urllib3.connectionpool").info("hidden too")
    logging.getLogger("apscheduler.scheduler").warning("shown")
    assert [line["event"] for line in lines(out)] == ["shown"]

    out = configure(level="debug")
    logging.getLogger("botocore.endpoint").debug("now shown")
    assert [line["event"] for line in lines(out)] == ["now shown"]


def test_exception_renders_as_a_traceback_string() -> None:
    out = configure()
    try:
        raise ValueError("bad thing")
    except ValueError:
        log.get_logger("rotator.daemon").exception("job_failed", target="t")
    (line,) = lines(out)
    assert line["event"] == "job_failed"
    assert line["level"] == "error"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad thing" in line["exception"]
    assert "exc_info" not in line


def test_configure_twice_does_not_duplicate_lines() -> None:
    first = configure()
    configure()
    third = configure()
    log.get_logger("rotator.cli").info("once")
    logging.getLogger("hvac").warning("library once")
    assert first.getvalue() == ""
    assert [line["event"] for line in lines(third)] == ["once", "library once"]
    ours = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h.formatter, structlog.stdlib.ProcessorFormatter)
    ]
    assert len(ours) == 1


def test_a_module_level_logger_follows_a_later_configure() -> None:
    logger = log.get_logger("rotator.engine")  # bound before configure, as modules do
    configure(fmt="console")
    out = configure(fmt="json")
    logger.info("after_reload")
    assert lines(out)[0]["event"] == "after_reload"


def test_invalid_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        log.configure(format="json", level="verbose", stream=io.StringIO())
    with pytest.raises(ValueError, match="log format"):
        log.configure(format="xml", level="info", stream=io.StringIO())


# --- console ---------------------------------------------------------------------------------


def test_console_format_renders_key_values_without_colors_off_a_terminal() -> None:
    out = configure(fmt="console", level="info")
    log.get_logger("rotator.engine").info("key_rotated", target="monitoring", key_id=KEY_ID)
    text = out.getvalue()
    assert "key_rotated" in text
    assert "target=monitoring" in text
    assert f"key_id={KEY_ID}" in text
    assert "\x1b[" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_format_redacts_fields_and_exceptions() -> None:
    out = configure(fmt="console")
    logger = log.get_logger("rotator.engine")
    logger.info("leak", detail=PLAIN_SECRET.reveal(), token=VAULT_TOKEN)
    try:
        raise RuntimeError(f"failed with {AWS_SECRET.reveal()}")
    except RuntimeError:
        logger.exception("pass_failed")
    text = out.getvalue()
    assert_clean(text)
    assert "RuntimeError: failed with **********" in text


# --- redaction in the pipeline -----------------------------------------------------------------


def test_a_secret_value_as_a_field_is_masked() -> None:
    out = configure()
    log.get_logger().info("oops", detail=PLAIN_SECRET.reveal(), key_id=KEY_ID)
    (line,) = lines(out)
    assert line["detail"] == log.MASK
    assert line["key_id"] == KEY_ID
    assert_clean(out.getvalue())


def test_a_secret_inside_the_message_string_is_masked() -> None:
    out = configure()
    log.get_logger().info(f"created key {KEY_ID} with secret {PLAIN_SECRET.reveal()}")
    (line,) = lines(out)
    assert line["event"] == f"created key {KEY_ID} with secret {log.MASK}"
    assert_clean(out.getvalue())


def test_secrets_in_nested_containers_are_masked() -> None:
    out = configure()
    log.get_logger().info(
        "response",
        body={
            "AccessKey": {"AccessKeyId": KEY_ID, "SecretAccessKey": AWS_SECRET.reveal()},
            "notes": [f"token {VAULT_TOKEN}", ("deep", {"x": PLAIN_SECRET.reveal()})],
        },
    )
    (line,) = lines(out)
    assert line["body"]["AccessKey"] == {"AccessKeyId": KEY_ID, "SecretAccessKey": log.MASK}
    assert line["body"]["notes"][0] == f"token {log.MASK}"
    assert line["body"]["notes"][1] == ["deep", {"x": log.MASK}]
    assert_clean(out.getvalue())


def test_secret_looking_field_names_are_masked_but_not_flags_counts_or_paths() -> None:
    out = configure()
    log.get_logger().info(
        "auth",
        password="hunter2",
        vault_token="anything-at-all",
        secret_id="role-secret",
        authorization="Bearer abc",
        jwt="eyJhbGciOiJSUzI1NiJ9.e30.sig",
        token_present=True,
        token=None,
        secret_count=2,
        secret_path="monitoring/watcher_1",
        token_file="/run/credentials/rotator.service/vault-token",
    )
    (line,) = lines(out)
    for name in ("password", "vault_token", "secret_id", "authorization", "jwt"):
        assert line[name] == log.MASK, name
    assert line["token_present"] is True
    assert line["token"] is None
    assert line["secret_count"] == 2
    assert line["secret_path"] == "monitoring/watcher_1"
    assert line["token_file"] == "/run/credentials/rotator.service/vault-token"


def test_a_secret_object_is_masked_whatever_its_field_name() -> None:
    out = configure()
    log.get_logger().info(
        "key",
        value=PLAIN_SECRET,
        pending=model.PendingKey(KEY_ID, PLAIN_SECRET, datetime(2025, 1, 1, tzinfo=UTC)),
    )
    (line,) = lines(out)
    assert line["value"] == log.MASK
    assert KEY_ID in line["pending"]
    assert_clean(out.getvalue())


def test_a_secret_in_an_exception_message_and_traceback_is_masked() -> None:
    out = configure()

    def publish(secret: str) -> None:
        raise RuntimeError(f"vault refused write of {secret} with X-Vault-Token: {VAULT_TOKEN}")

    try:
        publish(AWS_SECRET.reveal())
    except RuntimeError as exc:
        log.get_logger("rotator.engine").error("publish_failed", exc_info=exc, error=exc)
    (line,) = lines(out)
    assert "Traceback (most recent call last)" in line["exception"]
    assert "in publish" in line["exception"]
    assert f"RuntimeError: vault refused write of {log.MASK}" in line["exception"]
    assert line["error"].startswith(f"vault refused write of {log.MASK}")
    assert_clean(out.getvalue())


def test_a_library_exception_with_a_secret_is_masked() -> None:
    out = configure()
    try:
        raise ConnectionError(f"POST failed: body secret_access_key={PLAIN_SECRET.reveal()}")
    except ConnectionError:
        logging.getLogger("urllib3.connectionpool").warning("retrying", exc_info=True)
    (line,) = lines(out)
    assert "ConnectionError: POST failed" in line["exception"]
    assert_clean(out.getvalue())


def test_botocore_debug_output_keeps_the_key_id_and_masks_the_signature() -> None:
    out = configure(level="debug")
    botocore = logging.getLogger("botocore.endpoint")
    botocore.debug("Sending http request: %s", SIGV4_HEADER)
    botocore.debug(
        "Making request for OperationModel(name=CreateAccessKey) with params: %s",
        {
            "headers": {"Authorization": SIGV4_HEADER.removeprefix("Authorization: ").encode()},
            "body": f"Action=CreateAccessKey&X-Vault-Token={VAULT_TOKEN}",
        },
    )
    logging.getLogger("botocore.parsers").debug(
        "Response body:\nb'<CreateAccessKeyResult><AccessKey><AccessKeyId>%s</AccessKeyId>"
        "<SecretAccessKey>%s</SecretAccessKey></AccessKey></CreateAccessKeyResult>'",
        KEY_ID,
        "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2Fyc3Bs",  # not a known Secret, 44 chars
    )
    text = out.getvalue()
    assert len(lines(out)) == 3
    assert_clean(text)
    assert "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2Fyc3Bs" not in text
    assert text.count(f"Credential={KEY_ID}/20250301") == 2
    assert f"<AccessKeyId>{KEY_ID}</AccessKeyId>" in text


def test_a_vault_token_never_appears() -> None:
    out = configure()
    logger = log.get_logger("rotator.adapters.vault")
    logger.info(f"login ok, token {VAULT_TOKEN}")
    logger.info("login_ok", client_token_accessor_note=VAULT_TOKEN)
    logging.getLogger("hvac.adapters").debug("headers: %r", {"X-Vault-Token": VAULT_TOKEN})
    assert len(lines(out)) == 3
    assert_clean(out.getvalue())


# --- redact() ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            SIGV4_HEADER,
            SIGV4_HEADER.replace(SIGNATURE, log.MASK),
        ),
        (
            f"{{'X-Vault-Token': '{VAULT_TOKEN}', 'Host': 'vault'}}",
            f"{{'X-Vault-Token': '{log.MASK}', 'Host': 'vault'}}",
        ),
        ("X-Vault-Token: abc.def", f"X-Vault-Token: {log.MASK}"),
        ("Authorization: Bearer eyJhbGciOi.abc", f"Authorization: Bearer {log.MASK}"),
        (f"legacy token s.{'a1B2c3D4e5' * 2}xyzw", f"legacy token {log.MASK}"),
        (f"batch b.{'AAAAQJz9' * 4}", f"batch {log.MASK}"),
        ("aws_secret_access_key = abc/DEF+123", f"aws_secret_access_key = {log.MASK}"),
        (
            '{"secret_access_key": "abc def", "id": 1}',
            f'{{"secret_access_key": "{log.MASK}", "id": 1}}',
        ),
        ("Action=Login&password=hunter2&user=bob", f"Action=Login&password={log.MASK}&user=bob"),
        ("https://x/?X-Amz-Signature=ab12&y=1", f"https://x/?X-Amz-Signature={log.MASK}&y=1"),
        (f"Signature:\n{SIGNATURE}", f"Signature:\n{log.MASK}"),  # botocore.auth's debug line
        (f"{{'Signature': '{SIGNATURE}'}}", f"{{'Signature': '{log.MASK}'}}"),
        (f'{{"signature": "{SIGNATURE}"}}', f'{{"signature": "{log.MASK}"}}'),
        ("secret ABCDEFGHIJ0123456789ABCDEFGHIJ0123456789 end", f"secret {log.MASK} end"),
        (f"leaked {PLAIN_SECRET.reveal()}!", f"leaked {log.MASK}!"),
    ],
)
def test_redact_masks(text: str, expected: str) -> None:
    assert log.redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        f"key {KEY_ID} is current",
        "identity digest 3f786850e387550fdab836ed7e6dc881de23001b",  # lower-case hex sha1
        "read secret/data/rotator/targets/monitoring1 failed",  # a 40-char lower-case path
        "cannot read secret: permission denied on path monitoring/watcher_1",
        "secret_path=monitoring/watcher_1 token_ttl=3600",
        '{"token": null, "secret_id": ""}',
        "keys.AbCdEfGhIjKlMnOpQrStUvWxYz is not a token",
        "verification outcome=not_yet detail=SignatureDoesNotMatch",
        "set eim.signing_name: the request signature we calculated does not match",
    ],
)
def test_redact_keeps_what_operators_need(text: str) -> None:
    assert log.redact(text) == text


# --- known Secret values: Secret.find_in and the index behind it --------------------------------


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty registry of known values for one test (the real one is process-global)."""
    monkeypatch.setattr(model.Secret, "_known", {})
    monkeypatch.setattr(model.Secret, "_by_prefix", {})
    monkeypatch.setattr(model.Secret, "_shortest", 0)


@pytest.mark.usefixtures("registry")
def test_a_secret_embedded_in_a_longer_string_is_masked() -> None:
    value = model.Secret("embedded-secret-value-0001").reveal()
    assert model.Secret.find_in(f"prefix{value}suffix") == (value,)
    assert log.redact(f"prefix{value}suffix") == f"prefix{log.MASK}suffix"
    assert log.redact(f"{value}:{value}x{value}") == f"{log.MASK}:{log.MASK}x{log.MASK}"
    assert log.redact(value) == log.MASK
    assert log.redact(f"ends with {value}") == f"ends with {log.MASK}"


@pytest.mark.usefixtures("registry")
def test_a_secret_that_is_a_prefix_of_another_leaves_nothing_of_either() -> None:
    short = model.Secret("overlap-secret-0001").reveal()  # registered first, found first before
    long = model.Secret(f"{short}-and-more-0002").reveal()
    text = f"a {long} b {short} c"
    assert model.Secret.find_in(text) == (long, short)  # longest first
    assert log.redact(text) == f"a {log.MASK} b {log.MASK} c"


@pytest.mark.usefixtures("registry")
def test_secrets_sharing_their_first_eight_characters_are_all_masked() -> None:
    first = model.Secret("sharedpf-first-value").reveal()
    second = model.Secret("sharedpf-second-value").reveal()
    model.Secret("sharedpf-third-value-not-logged")
    text = f"{first} and {second}; sharedpf- alone"
    assert model.Secret.find_in(text) == (second, first)
    assert log.redact(text) == f"{log.MASK} and {log.MASK}; sharedpf- alone"


@pytest.mark.usefixtures("registry")
def test_two_secrets_overlapping_in_the_text_are_masked_as_one_stretch() -> None:
    head = model.Secret("partial-overlap-AAAA-BBBB").reveal()
    tail = model.Secret("AAAA-BBBB-partial-tail").reveal()
    text = f"x {head.removesuffix('AAAA-BBBB')}{tail} y"
    assert head in text and tail in text
    assert log.redact(text) == f"x {log.MASK} y"


@pytest.mark.usefixtures("registry")
def test_a_secret_registered_after_the_index_was_built_is_found() -> None:
    before = model.Secret("registered-before-0001").reveal()
    assert model.Secret.find_in(f"x {before} y") == (before,)  # builds the index
    after = model.Secret("registered-after-the-index-0002").reveal()
    assert model.Secret.find_in(f"x {before} {after} y") == (after, before)
    assert log.redact(f"late {after}") == f"late {log.MASK}"
    assert model.Secret.known_values() == (before, after)


@pytest.mark.usefixtures("registry")
def test_values_beyond_the_bound_are_forgotten_oldest_first() -> None:
    bound = model.Secret._KNOWN_MAX
    oldest = model.Secret("evicted-oldest-secret-value").reveal()
    assert model.Secret.find_in(f"x {oldest} y") == (oldest,)
    kept = [model.Secret(f"kept-secret-value-{n:06d}").reveal() for n in range(bound)]
    model.Secret(kept[1])  # wrapping a remembered value again does not make it the newest
    model.Secret(oldest)  # wrapping a forgotten value again remembers it as the newest

    known = model.Secret.known_values()
    assert len(known) == bound
    assert known[0] == kept[1] and known[-1] == oldest
    assert model.Secret.find_in(f"{kept[0]} {kept[1]} {kept[-1]}") == (kept[1], kept[-1])
    assert log.redact(f"old {kept[0]}") == f"old {kept[0]}"
    assert sum(map(len, model.Secret._by_prefix.values())) == bound  # the index forgot too


@pytest.mark.usefixtures("registry")
def test_short_strings_still_get_the_patterns() -> None:
    model.Secret("a-known-secret-of-forty-characters-00001")
    assert model.Secret.find_in("a-known-secret") == ()  # shorter than any known value
    assert log.redact("password=hunter2") == f"password={log.MASK}"
    assert log.redact("X-Vault-Token: abc.def") == f"X-Vault-Token: {log.MASK}"
    assert log.redact("ok") == "ok"
    assert log.redact("") == ""


@pytest.mark.usefixtures("registry")
def test_short_values_are_not_remembered() -> None:
    model.Secret("1234567")
    assert model.Secret.known_values() == ()
    assert model.Secret.find_in("x 1234567 y") == ()


@pytest.mark.usefixtures("registry")
def test_find_in_agrees_with_a_search_for_every_known_value() -> None:
    # Two letters: values share prefixes and overlap in the text all the time.
    rng = random.Random(20250301)
    values = {"".join(rng.choice("ab") for _ in range(rng.randint(8, 14))) for _ in range(60)}
    for value in values:
        model.Secret(value)
    for _ in range(300):
        text = "".join(rng.choice(["a", "b", " ", "ab", "ba", "aab"]) for _ in range(30))
        found = model.Secret.find_in(text)
        assert set(found) == {value for value in values if value in text}
        assert len(found) == len(set(found))
        assert [len(value) for value in found] == sorted(map(len, found), reverse=True)
        redacted = log.redact(text)
        assert not [value for value in values if value in redacted]


def test_the_shortest_token_a_pattern_knows_is_masked_at_the_length_gate() -> None:
    shortest = "s." + "A1b2C3d4E5f6G7h8I9j0"  # a legacy Vault token: 22 characters
    assert len(shortest) == 22
    assert log.redact(shortest) == log.MASK
    assert log.redact(shortest[:-1]) == shortest[:-1]  # one shorter: no pattern can match
