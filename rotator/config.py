"""The typed, validated settings, loaded once from YAML (and a little environment) at startup.

:func:`load` reads the file, validates every key and the rules that span keys (DESIGN.md
sections 1 and 4), and returns a frozen :class:`Settings`. Every problem becomes one
:class:`~rotator.errors.ConfigError` that names the key path (``targets[0].grace``) and says how
to fix it; no pydantic, YAML or OS exception leaves this module.

Relative file names are resolved against the config file's directory at load. Secret files
(the EIM credentials, Vault tokens, the AppRole secret id) are *not* read at load: systemd
credentials and Kubernetes tokens are rotated under a running process, so they are read where
they are used, through :func:`read_eim_credentials`, :func:`read_vault_token` and
:func:`read_secret_file`. A ``*_file`` value written ``credential:NAME`` names a systemd
credential and is resolved against ``$CREDENTIALS_DIRECTORY`` when read (:func:`resolve_file`).

This module never imports a client library (boto3, hvac, apscheduler, prometheus_client) and
never puts a secret into a model, a repr or an error message.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from rotator import errors
from rotator.model import Secret

CREDENTIAL_PREFIX = "credential:"
POLICY_MAX_CHARS = 5120  # EIM's limit on a policy document, whitespace removed
# Bounds on what is read whole: a huge file must give an error, not an out-of-memory kill (a
# FIFO or a device such as /dev/zero is refused before it is opened). Each is far above any
# real file of its kind.
CONFIG_FILE_MAX_CHARS = 16 * 1024 * 1024  # a fleet of many thousand targets
POLICY_FILE_MAX_CHARS = 64 * 1024  # 5120 characters of JSON, however indented
SECRET_FILE_MAX_CHARS = 64 * 1024  # a key pair, a Vault token, a service account JWT
POLICY_MAX_DEPTH = 32  # a real policy nests 4 or 5 levels
# Every duration is at most ten years: longer ones overflow date arithmetic (now + max_age
# past the year 9999) and are a typo anyway.
MAX_DURATION = timedelta(days=3650)
MAX_DURATION_TEXT = "3650d (10 years)"
# Key slots per user: OUTSCALE allows up to 10 access keys per user (or the account's quota),
# AWS and moto 2; 100 leaves room for any quota while keeping slot arithmetic sane.
MAX_KEYS_LIMIT = 100
REGION_MAX_CHARS = 63  # the region is one DNS label of the derived endpoint
DEFAULT_K8S_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

_ERROR_TYPE = "rotator_config"


def _invalid(message: str, *key: str | int) -> PydanticCustomError:
    """An error about the sub-key ``key`` of the value being validated (loc + key)."""
    return PydanticCustomError(_ERROR_TYPE, "{message}", {"message": message, "key": key})


# --- durations -------------------------------------------------------------------------------

_UNITS: tuple[tuple[str, timedelta], ...] = (
    ("w", timedelta(weeks=1)),
    ("d", timedelta(days=1)),
    ("h", timedelta(hours=1)),
    ("m", timedelta(minutes=1)),
    ("s", timedelta(seconds=1)),
    ("ms", timedelta(milliseconds=1)),
)
_DURATION_RE = re.compile(
    r"(?:(?P<w>[0-9]+)w)?(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?"
    r"(?:(?P<s>[0-9]+)s)?(?:(?P<ms>[0-9]+)ms)?"
)


def _duration_hint(text: str) -> str:
    return (
        f"invalid duration '{text}': use a number with a unit (ms, s, m, h, d, w), "
        "for example 90s or 1h30m"
    )


def parse_duration(text: str) -> timedelta:
    """``500ms``, ``90s``, ``1h30m``... as a positive timedelta of at most MAX_DURATION;
    ValueError with a hint if not."""
    value = text.strip()
    match = _DURATION_RE.fullmatch(value)
    if not value or match is None:
        raise ValueError(_duration_hint(text))
    # Summed as whole milliseconds: a timedelta overflows (OverflowError) on huge amounts.
    total_ms = 0
    for unit, size in _UNITS:
        amount = match.group(unit)
        if amount is not None:
            if len(amount) > 15:  # past any bound, and int() refuses over 4300 digits
                raise ValueError(_too_long(text))
            total_ms += int(amount) * (size // timedelta(milliseconds=1))
    if total_ms <= 0:
        raise ValueError(f"duration '{text}' must be greater than zero")
    if total_ms > MAX_DURATION // timedelta(milliseconds=1):
        raise ValueError(_too_long(text))
    return timedelta(milliseconds=total_ms)


def _too_long(text: str) -> str:
    shown = text if len(text) <= 40 else text[:37] + "..."
    return f"duration '{shown}' is too long: use at most {MAX_DURATION_TEXT}"


def format_duration(value: timedelta) -> str:
    """The canonical text of a duration, largest unit first (``5400s`` -> ``1h30m``).

    Weeks are accepted on input but not produced (``30d`` reads better than ``4w2d``); the
    result is rounded to the millisecond and parses back to the same value.
    """
    total_ms = round(value / timedelta(milliseconds=1))
    if total_ms == 0:
        return "0s"
    sign = "-" if total_ms < 0 else ""
    remaining = abs(total_ms)
    parts: list[str] = []
    for unit, size in _UNITS[1:]:
        unit_ms = size // timedelta(milliseconds=1)
        amount, remaining = divmod(remaining, unit_ms)
        if amount:
            parts.append(f"{amount}{unit}")
    return sign + "".join(parts)


def _duration_value(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        if value <= timedelta(0):
            raise ValueError(f"duration '{format_duration(value)}' must be greater than zero")
        if value > MAX_DURATION:
            raise ValueError(_too_long(format_duration(value)))
        return value
    if isinstance(value, str):
        return parse_duration(value)
    # A bare number is refused: 90 could mean seconds or minutes depending on who reads it.
    raise ValueError(_duration_hint(str(value)))


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration_value),
    PlainSerializer(format_duration, return_type=str),
]


def _at_least(minimum: timedelta, why: str) -> AfterValidator:
    """A lower bound on a duration key: shorter values load but cannot work at run."""

    def check(value: timedelta) -> timedelta:
        if value < minimum:
            raise ValueError(
                f"{format_duration(value)} is too short: use at least "
                f"{format_duration(minimum)}; {why}"
            )
        return value

    return AfterValidator(check)


# The lower bounds. Each one leaves room for the tests' and the demo's deliberately short
# timings (check_interval 1s, lock_ttl 2s, timeouts of 1s or more).
MIN_CHECK_INTERVAL = timedelta(seconds=1)
MIN_LOCK_TTL = timedelta(seconds=1)
MIN_CONNECT_TIMEOUT = timedelta(milliseconds=100)
MIN_CALL_TIMEOUT = timedelta(seconds=1)

CheckInterval = Annotated[
    Duration,
    _at_least(
        MIN_CHECK_INTERVAL,
        "each check lists the user's keys in IAM and reads Vault, so checking more often "
        "only hammers both",
    ),
]
LockTtl = Annotated[
    Duration,
    _at_least(
        MIN_LOCK_TTL,
        "the lease is renewed every third of it by a round trip to Vault, which must land "
        "before the lease expires",
    ),
]
ConnectTimeout = Annotated[
    Duration,
    _at_least(MIN_CONNECT_TIMEOUT, "a shorter one fails connections that are merely not local"),
]
CallTimeout = Annotated[
    Duration,
    _at_least(MIN_CALL_TIMEOUT, "a shorter one fails calls that are merely slow"),
]


# --- paths -----------------------------------------------------------------------------------


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context if isinstance(info.context, Mapping) else {}
    base = context.get("base_dir")
    return Path(base) if base is not None else Path.cwd()


def _credential_name(text: str) -> str:
    name = text[len(CREDENTIAL_PREFIX) :]
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(
            f"invalid credential reference '{text}': write credential:NAME with the NAME of a "
            "systemd LoadCredential= entry (a plain file name)"
        )
    return name


def _config_path(value: Any, base: Path) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a file path, got {_show(value)}")
    if not value.strip():
        raise ValueError("the file path is empty: give a path, or remove the key")
    if value.startswith(CREDENTIAL_PREFIX):
        _credential_name(value)
        return Path(value)  # resolved when read: $CREDENTIALS_DIRECTORY may differ then
    path = Path(value).expanduser()
    # Not normalised or resolved: a ConfigMap mounts files through symlinks that change on
    # update, and lexical '..' removal can differ from what the kernel does.
    return path if path.is_absolute() else base / path


def _config_path_validator(value: Any, info: ValidationInfo) -> Path:
    return _config_path(value, _base_dir(info))


ConfigPath = Annotated[Path, BeforeValidator(_config_path_validator)]


def resolve_file(path: str | os.PathLike[str], key_path: str) -> Path:
    """The file to open for a ``*_file`` setting (``credential:NAME``: in $CREDENTIALS_DIRECTORY).

    Use it for files read outside this module too (``vault.ca_file``).
    """
    text = os.fspath(path)
    if not text.startswith(CREDENTIAL_PREFIX):
        return Path(text)
    try:
        name = _credential_name(text)
    except ValueError as exc:
        raise errors.ConfigError(key_path, str(exc)) from None
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise errors.ConfigError(
            key_path,
            f"'{text}' names a systemd credential but CREDENTIALS_DIRECTORY is not set: run "
            f"rotator under systemd with LoadCredential={name}:<file>, or give a file path; by "
            "hand on the service's host, set CREDENTIALS_DIRECTORY to the directory of those "
            "files (sudo CREDENTIALS_DIRECTORY=/etc/rotator/secrets rotator ...)",
        )
    return Path(directory) / name


# --- names, URLs, addresses ------------------------------------------------------------------

_TARGET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_IAM_NAME_CHARS = r"[A-Za-z0-9+=,.@_-]"
_USER_RE = re.compile(_IAM_NAME_CHARS + "{1,64}")
_GROUP_RE = re.compile(_IAM_NAME_CHARS + "{1,128}")
_POLICY_NAME_RE = re.compile(_IAM_NAME_CHARS + "{1,128}")
_REGION_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_VAULT_PATH_BAD_CHARS = re.compile(r"[\s?#%\x00-\x1f\x7f]")
_SIGNING_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?")
_POLICY_PATH_RE = re.compile(r"/(?:[!-~]*/)?")  # EIM's pattern: printable ASCII, no space
# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: in an HTTP
# header they end or split it, in the SigV4 scope they break the signature, in a request body
# they make a name that matches nothing.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _check_no_control(value: str) -> str:
    """Free text that reaches the network (a header, a URL, a request body, the SigV4 scope):
    refuse control characters, which YAML lets through in a quoted or block scalar."""
    found = _CONTROL_CHARS.search(value)
    if found is not None:
        raise ValueError(
            f"{_show(value)} holds the control character {found.group()!r} (position "
            f"{found.start() + 1}): remove it; this value is sent to the server as is"
        )
    return value


def _check_text(value: str) -> str:
    """A name or id sent as is (``vault.namespace``, ``role``, ``role_id``): non-empty, no
    control character, no whitespace around it (Vault would look up another name)."""
    _check_nonempty(value)
    _check_no_control(value)
    if value != value.strip():
        raise ValueError(
            f"{_show(value)} starts or ends with whitespace: remove it, the server would "
            "look up another name"
        )
    return value


def _check_header_text(value: str) -> str:
    """A value sent as an HTTP header (``X-Vault-Namespace``): printable ASCII."""
    _check_text(value)
    if not value.isascii():
        raise ValueError(
            f"{_show(value)} is sent as the HTTP header X-Vault-Namespace, which takes ASCII "
            "only: use the namespace's ASCII path, such as admin/team"
        )
    return value


def _check_signing_name(value: str) -> str:
    _check_nonempty(value)
    _check_no_control(value)
    if not _SIGNING_NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid signing name {_show(value)}: use a service name of letters, digits and "
            "'-' as in the SigV4 scope, such as iam (the default) or eim (OUTSCALE's tools)"
        )
    return value


def _check_target_name(value: str) -> str:
    if not _TARGET_NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid target name '{value}': use 1-63 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit (it is a Vault path segment and a metric label)"
        )
    return value


def _check_user(value: str) -> str:
    if not _USER_RE.fullmatch(value):
        raise ValueError(
            f"invalid user name '{value}': EIM user names are 1-64 characters from "
            "A-Z a-z 0-9 + = , . @ _ -"
        )
    return value


def _check_group(value: str) -> str:
    if not _GROUP_RE.fullmatch(value):
        raise ValueError(
            f"invalid group name '{value}': use 1-128 characters from A-Z a-z 0-9 + = , . @ _ -"
        )
    return value


def _check_policy_name(value: str) -> str:
    if not _POLICY_NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid policy name '{value}': use 1-128 characters from A-Z a-z 0-9 + = , . @ _ -"
        )
    return value


def _check_policy_path(value: str) -> str:
    _check_no_control(value)
    if not (1 <= len(value) <= 512 and value.startswith("/") and value.endswith("/")):
        raise ValueError(
            f"invalid policy path '{value}': use 1-512 characters starting and ending with '/', "
            "for example / or /rotator/"
        )
    if not _POLICY_PATH_RE.fullmatch(value):
        raise ValueError(
            f"invalid policy path {_show(value)}: use printable ASCII without spaces between "
            "the '/', for example /rotator/"
        )
    return value


def _check_region(value: str) -> str:
    if len(value) > REGION_MAX_CHARS:
        raise ValueError(
            f"region {_show(value)} is {len(value)} characters long: a region name has at most "
            f"{REGION_MAX_CHARS} (such as eu-west-2 or cloudgouv-eu-west-1)"
        )
    if not _REGION_RE.fullmatch(value):
        raise ValueError(
            f"invalid region '{value}': use a region name such as eu-west-2 or us-east-1"
        )
    return value


def _check_vault_path(value: str) -> str:
    if not value:
        raise ValueError("the path is empty: give a path such as monitoring/watcher_1")
    if value.startswith("/") or value.endswith("/"):
        raise ValueError(f"invalid path '{value}': remove the leading and trailing '/'")
    if any(segment in ("", ".", "..") for segment in value.split("/")):
        raise ValueError(f"invalid path '{value}': empty, '.' and '..' segments are not allowed")
    if _VAULT_PATH_BAD_CHARS.search(value):
        raise ValueError(
            f"invalid path {value!r}: whitespace, control characters, '?', '#' and '%' "
            "are not allowed"
        )
    return value


def _check_url(value: str) -> str:
    # Before urlsplit, which silently drops tabs and newlines that the client would then send.
    if _CONTROL_CHARS.search(value) or any(c.isspace() for c in value):
        raise ValueError(
            "the URL holds whitespace or a control character: remove it; write "
            "http://host:port or https://host[:port]"
        )
    parts = urlsplit(value)
    # Checked before the URL is echoed anywhere: it might carry a password, or a token in its
    # query (?key=...). The characters, not the parts: a bare '?' or '#' is an empty part.
    if "@" in parts.netloc:
        raise ValueError(
            "the URL must not carry credentials (user:password@): use the credential settings"
        )
    if "?" in value or "#" in value:
        shown = _show(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
        raise ValueError(
            f"the URL {shown} is followed by a query ('?...') or a fragment ('#...'), not shown "
            "here: remove it; an endpoint takes none, and credentials go in the credential "
            "settings"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"invalid URL '{value}': use http://host:port or https://host[:port], such as "
            "https://eim.eu-west-2.outscale.com for eim.endpoint or https://vault.example:8200 "
            "for vault.address"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in URL '{value}': use a number from 1 to 65535") from None
    if port == 0:
        raise ValueError(
            f"port 0 in URL '{value}' cannot be connected to: use the server's port, a number "
            "from 1 to 65535, or leave the port out for the scheme's default"
        )
    return value


def _check_nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("the value is empty: give a value, or remove the key")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port); ValueError with a hint otherwise."""
    hint = "use host:port, for example 0.0.0.0:9109, 127.0.0.1:9109 or [::1]:9109"
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        if end < 0 or not rest.startswith(":"):
            raise ValueError(f"invalid listen address '{text}': {hint}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"invalid listen address '{text}': brackets hold an IPv6 address; {hint}"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid listen address '{text}': the port is missing; {hint}")
        if ":" in host:
            raise ValueError(
                f"invalid listen address '{text}': put an IPv6 address in brackets; {hint}"
            )
        if not host:
            raise ValueError(
                f"invalid listen address '{text}': the host is missing (0.0.0.0 listens on "
                f"every interface); {hint}"
            )
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if re.fullmatch(r"[0-9.]+", host) or not _HOSTNAME_RE.fullmatch(host):
                raise ValueError(
                    f"invalid listen address '{text}': '{host}' is neither an IP address nor "
                    f"a host name; {hint}"
                ) from None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError(
            f"invalid listen address '{text}': the port must be a number from 0 to 65535; {hint}"
        )
    return host, int(port_text)


def _check_listen(value: str) -> str:
    parse_listen(value)
    return value


_CRON_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CRON_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_CRON_NAMES = frozenset((*_CRON_DAYS, *_CRON_MONTHS))


def _check_cron(value: str) -> str:
    fields = value.split()
    hint = (
        f"invalid rotation_window '{value}': use a cron expression in UTC with 5 fields "
        "(minute hour day-of-month month day-of-week), for example '* 8-17 * * mon-fri'"
    )
    if len(fields) != 5:
        raise ValueError(hint)
    for field_text in fields:
        for part in re.split(r"[,/-]", field_text):
            if not (part == "*" or re.fullmatch(r"[0-9]+", part) or part.lower() in _CRON_NAMES):
                raise ValueError(hint)
    return " ".join(fields)


def _check_max_keys(value: int) -> int:
    if value < 2:
        raise ValueError(
            f"max_keys is {value} but must be at least 2: one slot for the new key while the "
            "current one stays valid"
        )
    if value > MAX_KEYS_LIMIT:
        raise ValueError(
            f"max_keys is {_show(value)} but must be at most {MAX_KEYS_LIMIT}: it is the number "
            "of access keys the user may hold (OUTSCALE allows up to 10 per user, AWS 2)"
        )
    return value


TargetName = Annotated[str, AfterValidator(_check_target_name)]
UserName = Annotated[str, AfterValidator(_check_user)]
GroupName = Annotated[str, AfterValidator(_check_group)]
PolicyName = Annotated[str, AfterValidator(_check_policy_name)]
VaultPath = Annotated[str, AfterValidator(_check_vault_path)]
Url = Annotated[str, AfterValidator(_check_url)]
Text = Annotated[str, AfterValidator(_check_text)]
HeaderText = Annotated[str, AfterValidator(_check_header_text)]
SigningName = Annotated[str, AfterValidator(_check_signing_name)]
MaxKeys = Annotated[int, Field(strict=True), AfterValidator(_check_max_keys)]
CronExpression = Annotated[str, AfterValidator(_check_cron)]


# --- policy documents ------------------------------------------------------------------------


def _json_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _too_deep() -> ValueError:
    return ValueError(
        f"the policy document is nested too deeply: at most {POLICY_MAX_DEPTH} levels of "
        "objects and lists (a policy needs 4 or 5)"
    )


def _check_json_values(value: Any, where: str, depth: int = 0) -> None:
    """Refuse what YAML produces but JSON cannot hold (dates, non-string keys, NaN), and
    nesting deeper than POLICY_MAX_DEPTH (json.dumps would hit the recursion limit)."""
    if isinstance(value, Mapping | list | tuple) and depth >= POLICY_MAX_DEPTH:
        raise _too_deep()
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"policy document key {key!r} at {where or 'the top'} is not a string: quote it"
                )
            _check_json_values(item, _json_path(where, key), depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json_values(item, _json_path(where, index), depth + 1)
    elif isinstance(value, date):
        raise ValueError(
            f"policy document value {where} is a date in YAML: quote it, for example "
            f"'{value.isoformat()}'"
        )
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"policy document value {where} is not a finite number")
    elif not (value is None or isinstance(value, str | int | float | bool)):
        raise ValueError(
            f"policy document value {where} is a {type(value).__name__}, which JSON cannot hold"
        )


def _check_policy_document(document: Any) -> dict[str, Any]:
    """A plain-JSON copy of ``document`` once it looks like a policy EIM would take."""
    if not isinstance(document, Mapping):
        raise ValueError(
            f"a policy document must be a JSON object with a Statement, got {_show(document)}"
        )
    _check_json_values(document, "")
    plain: dict[str, Any] = json.loads(json.dumps(document))
    statements = plain.get("Statement")
    if statements is None:
        raise ValueError(
            "the policy document has no Statement (element names are case-sensitive: "
            "Statement, Effect, Action, Resource)"
        )
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise ValueError("the policy document's Statement must be an object or a non-empty list")
    for index, statement in enumerate(statements):
        if not isinstance(statement, dict):
            raise ValueError(f"Statement[{index}] of the policy document must be an object")
        if statement.get("Effect") not in ("Allow", "Deny"):
            raise ValueError(
                f"Statement[{index}] of the policy document needs Effect Allow or Deny"
            )
        if "Action" not in statement and "NotAction" not in statement:
            raise ValueError(f"Statement[{index}] of the policy document needs Action or NotAction")
    size = len(json.dumps(plain, separators=(",", ":"), ensure_ascii=False))
    if size > POLICY_MAX_CHARS:
        raise ValueError(
            f"the policy document is {size} characters without whitespace; EIM accepts at most "
            f"{POLICY_MAX_CHARS}: shorten it (wildcards such as ec2:Describe* help)"
        )
    return plain


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_int(text: str) -> int:
    if len(text) > 100:  # int() refuses over 4300 digits, with advice that does not apply here
        raise ValueError(f"a number of {len(text)} digits is too long: shorten it")
    return int(text)


_FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class _NotRegularFile(Exception):
    """A file to be read is a FIFO, a device, a socket or a directory; ``kind`` says which."""

    def __init__(self, mode: int) -> None:
        self.kind = next((kind for test, kind in _FILE_KINDS if test(mode)), "a special file")
        super().__init__(self.kind)


def _open_regular(file: Path) -> int:
    """A read-only descriptor of ``file`` once it is known to be a regular file (or a symlink
    to one); _NotRegularFile otherwise, and OSError as os.open raises it.

    Opening a FIFO blocks until a writer comes, for ever in check-config, and opening a device
    may do anything: the kind is checked before the open, and again on the descriptor, opened
    with O_NONBLOCK so that a name swapped for a FIFO in between cannot block it either.
    """
    mode = os.stat(file).st_mode
    if not stat.S_ISREG(mode):
        raise _NotRegularFile(mode)
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotRegularFile(mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_bounded(file: Path, limit: int) -> str | None:
    """The text of the regular file ``file``, or None if it is longer than ``limit`` characters.

    Raises _NotRegularFile for anything else (see :func:`_open_regular`), and never reads more
    than ``limit + 1`` characters: a huge file is refused at once instead of filling memory.
    """
    with os.fdopen(_open_regular(file), encoding="utf-8") as stream:
        text = stream.read(limit + 1)
    return None if len(text) > limit else text


def _read_policy_file(path: Path) -> Any:
    try:
        file = resolve_file(path, "")
        text = _read_bounded(file, POLICY_FILE_MAX_CHARS)
    except errors.ConfigError as exc:
        raise ValueError(exc.message) from None
    except _NotRegularFile as exc:
        raise ValueError(
            f"the policy document {path} is {exc.kind}, not a regular file: give the JSON file "
            "of the policy (document_file is relative to the config file's directory)"
        ) from None
    except OSError as exc:
        raise ValueError(
            f"cannot read the policy document {path}: {exc.strerror or exc} "
            "(document_file is relative to the config file's directory)"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"the policy document {path} is not UTF-8 text") from None
    if text is None:
        raise ValueError(
            f"the policy document {path} is too long: more than {POLICY_FILE_MAX_CHARS} "
            f"characters, where EIM accepts at most {POLICY_MAX_CHARS} without whitespace; "
            "shorten it"
        )
    try:
        document = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except RecursionError:
        raise ValueError(
            f"the policy document {path} is nested too deeply: at most {POLICY_MAX_DEPTH} "
            "levels of objects and lists (a policy needs 4 or 5)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"the policy document {path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise ValueError(f"the policy document {path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"the policy document {path} must hold a JSON object, not a JSON array")
    return document


def _canonical_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


# --- the models ------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EimSettings(_Model):
    """How to reach EIM (or AWS IAM, or any IAM-compatible endpoint)."""

    provider: Literal["outscale", "aws"] = "outscale"
    region: Annotated[str, AfterValidator(_check_region)] = "eu-west-2"
    endpoint: Url | None = None
    signing_name: SigningName = "iam"
    connect_timeout: ConnectTimeout = timedelta(seconds=5)
    read_timeout: CallTimeout = timedelta(seconds=15)
    max_attempts: Annotated[int, Field(strict=True, ge=1, le=20)] = 5
    credentials_file: ConfigPath | None = None
    verify_action: Literal["iam:GetUser", "sts:GetCallerIdentity"] = "iam:GetUser"

    @property
    def endpoint_url(self) -> str | None:
        """The IAM endpoint to call; None on AWS without an endpoint (boto3 picks it)."""
        if self.endpoint is not None:
            return self.endpoint
        if self.provider == "outscale":
            return f"https://eim.{self.region}.outscale.com"
        return None


class AppRoleSettings(_Model):
    role_id: Text
    secret_id_file: ConfigPath
    mount: VaultPath = "approle"


class KubernetesAuthSettings(_Model):
    role: Text
    token_file: ConfigPath = DEFAULT_K8S_TOKEN_FILE
    mount: VaultPath = "kubernetes"


class VaultAuthSettings(_Model):
    method: Literal["token", "approle", "kubernetes"] = "token"
    token_file: ConfigPath | None = None
    approle: AppRoleSettings | None = None
    kubernetes: KubernetesAuthSettings | None = None

    @model_validator(mode="after")
    def _method_block(self) -> Self:
        if self.method == "approle" and self.approle is None:
            raise _invalid(
                "method approle needs an approle block with role_id and secret_id_file",
                "approle",
            )
        if self.method == "kubernetes" and self.kubernetes is None:
            raise _invalid(
                "method kubernetes needs a kubernetes block with at least role",
                "kubernetes",
            )
        return self


def unused_settings(settings: Settings) -> list[str]:
    """Settings that load but do nothing (one line each): an auth block of another method."""
    auth = settings.vault.auth
    method = auth.method
    unused = [
        key
        for key, value, used_by in (
            ("token_file", auth.token_file, "token"),
            ("approle", auth.approle, "approle"),
            ("kubernetes", auth.kubernetes, "kubernetes"),
        )
        if value is not None and method != used_by
    ]
    return [
        f"vault.auth.{key} is set but not used: vault.auth.method is {method}; remove it, or "
        f"set the method that uses it"
        for key in unused
    ]


class VaultSettings(_Model):
    """Where keys are published and the rotator keeps its state and locks."""

    address: Url  # from VAULT_ADDR when the YAML has none
    auth: VaultAuthSettings = Field(default_factory=VaultAuthSettings)
    mount: VaultPath = "secret"
    state_path: VaultPath = "rotator"
    lock_ttl: LockTtl = timedelta(seconds=15)
    ca_file: ConfigPath | None = None
    namespace: HeaderText | None = None
    timeout: CallTimeout = timedelta(seconds=10)

    @model_validator(mode="before")
    @classmethod
    def _address_from_environment(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("address") is not None:
            return data
        address = os.environ.get("VAULT_ADDR", "").strip()
        if not address:
            raise _invalid("no Vault address: set vault.address or VAULT_ADDR", "address")
        try:
            _check_url(address)
        except ValueError as exc:
            raise _invalid(f"{exc} (taken from VAULT_ADDR)", "address") from None
        return {**data, "address": address}


class Timing(_Model):
    """When keys are checked, rotated, retired and deleted (DESIGN.md section 1)."""

    check_interval: CheckInterval = timedelta(minutes=5)
    max_age: Duration = timedelta(days=30)
    grace: Duration = timedelta(hours=24)
    inactive_period: Duration = timedelta(days=3)
    max_keys: MaxKeys = 2
    verify_timeout: Duration = timedelta(minutes=2)
    identity_check_interval: Duration = timedelta(hours=1)
    rotation_window: CronExpression | None = None  # UTC; None: any time


TIMING_KEYS: tuple[str, ...] = tuple(Timing.model_fields)


class PolicySpec(_Model):
    """The managed policy attached to a target's group; ``document`` is always resolved."""

    name: PolicyName
    description: Annotated[str, Field(max_length=1000), AfterValidator(_check_no_control)] = ""
    path: Annotated[str, AfterValidator(_check_policy_path)] = "/"
    document_file: ConfigPath | None = None
    document: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _resolve_document(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        has_file = data.get("document_file") is not None
        has_inline = data.get("document") is not None
        if has_file and has_inline:
            raise _invalid("give either document_file or document, not both", "document")
        if not has_file and not has_inline:
            raise _invalid(
                "the policy needs its document: set document_file (a JSON file, relative to the "
                "config file) or document (an inline mapping)"
            )
        data = dict(data)
        key = "document_file" if has_file else "document"
        try:
            if has_file:
                data["document_file"] = _config_path(data["document_file"], _base_dir(info))
                document = _read_policy_file(data["document_file"])
            else:
                document = data["document"]
            data["document"] = _check_policy_document(document)
        except ValueError as exc:
            raise _invalid(str(exc), key) from None
        return data

    def canonical_document(self) -> str:
        """The document as sorted, compact JSON: equal documents give equal strings."""
        return _canonical_json(self.document)

    def __hash__(self) -> int:  # the generated one would fail on the document dict
        return hash((self.name, self.description, self.path, self.canonical_document()))


class Target(_Model):
    """One managed identity: a user whose keys rotate, optionally its group and policy."""

    name: TargetName
    user: UserName
    group: GroupName | None = None
    policy: PolicySpec | None = None
    secret_path: VaultPath
    # Per-target overrides of the defaults block; None: inherit.
    check_interval: CheckInterval | None = None
    max_age: Duration | None = None
    grace: Duration | None = None
    inactive_period: Duration | None = None
    max_keys: MaxKeys | None = None
    verify_timeout: Duration | None = None
    identity_check_interval: Duration | None = None
    rotation_window: CronExpression | None = None

    _timing: Timing | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _policy_needs_group(self) -> Self:
        if self.policy is not None and self.group is None:
            raise _invalid(
                "a policy is attached to a group, so policy needs group: set group (the user "
                "joins it and it gets the policy), or remove policy",
                "group",
            )
        return self

    @property
    def overrides(self) -> dict[str, Any]:
        """The timing keys this target sets itself."""
        return {key: getattr(self, key) for key in TIMING_KEYS if getattr(self, key) is not None}

    @property
    def timing(self) -> Timing:
        """The defaults merged with this target's overrides (resolved when Settings loads)."""
        if self._timing is not None:
            return self._timing
        return Timing().model_copy(update=self.overrides)

    def with_defaults(self, defaults: Timing) -> Target:
        """A copy whose ``timing`` is ``defaults`` merged with this target's overrides."""
        copy = self.model_copy()
        copy._timing = defaults.model_copy(update=self.overrides)
        return copy


class MetricsSettings(_Model):
    listen: Annotated[str, AfterValidator(_check_listen)] = "0.0.0.0:9109"

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


class LoggingSettings(_Model):
    format: Literal["json", "console"] | None = None  # None: console on a terminal, else json
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(_Model):
    """Everything rotator needs, validated and frozen."""

    eim: EimSettings = Field(default_factory=EimSettings)
    vault: VaultSettings
    defaults: Timing = Field(default_factory=Timing)
    targets: tuple[Target, ...]
    workers: Annotated[int, Field(strict=True, ge=1, le=64)] = 4
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    source: Path  # the config file, absolute; set by load(), not a YAML key

    @model_validator(mode="before")
    @classmethod
    def _empty_blocks(cls, data: Any) -> Any:
        # `vault:` followed only by comments is None in YAML: treat it as an empty block, and a
        # missing vault block as an empty one (the address may come from VAULT_ADDR).
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in ("eim", "vault", "defaults", "metrics", "logging"):
            if key in data and data[key] is None:
                data[key] = {}
        data.setdefault("vault", {})
        return data

    @field_validator("targets")
    @classmethod
    def _resolve_targets(cls, targets: tuple[Target, ...], info: ValidationInfo) -> Any:
        if not targets:
            raise ValueError("no targets: list at least one target (name, user, secret_path)")
        defaults = info.data.get("defaults")
        if defaults is None:  # the defaults block is invalid; that error is reported
            return targets
        resolved = tuple(target.with_defaults(defaults) for target in targets)
        vault = info.data.get("vault")
        _check_targets(resolved, None if vault is None else vault.state_path)
        return resolved


def _check_targets(targets: tuple[Target, ...], state_path: str | None) -> None:
    names: dict[str, int] = {}
    users: dict[str, int] = {}
    secret_paths: dict[str, int] = {}
    policies: dict[str, tuple[int, PolicySpec]] = {}
    for index, target in enumerate(targets):
        if target.name in names:
            raise _invalid(
                f"target name '{target.name}' is already used by targets[{names[target.name]}]: "
                "target names must be unique",
                index,
                "name",
            )
        names[target.name] = index
        user = target.user.casefold()  # IAM user names do not differ by case alone
        if user in users:
            raise _invalid(
                f"user '{target.user}' is already managed by targets[{users[user]}]: one target "
                "per user, or the two would rotate each other's keys",
                index,
                "user",
            )
        users[user] = index
        if target.secret_path in secret_paths:
            raise _invalid(
                f"secret_path '{target.secret_path}' is already used by "
                f"targets[{secret_paths[target.secret_path]}]: each target publishes to its own "
                "path",
                index,
                "secret_path",
            )
        secret_paths[target.secret_path] = index
        if state_path is not None and (
            target.secret_path == state_path or target.secret_path.startswith(state_path + "/")
        ):
            raise _invalid(
                f"secret_path '{target.secret_path}' is inside vault.state_path '{state_path}', "
                "where the rotator keeps its private state: choose another path",
                index,
                "secret_path",
            )
        if target.policy is not None:
            _check_policy_consistency(index, target.policy, policies)
        _check_timing(index, target.timing)


def _check_policy_consistency(
    index: int, policy: PolicySpec, seen: dict[str, tuple[int, PolicySpec]]
) -> None:
    if policy.name not in seen:
        seen[policy.name] = (index, policy)
        return
    first_index, first = seen[policy.name]
    for what, differs in (
        ("document", first.canonical_document() != policy.canonical_document()),
        ("description", first.description != policy.description),
        ("path", first.path != policy.path),
    ):
        if differs:
            raise _invalid(
                f"policy '{policy.name}' is also defined by targets[{first_index}] with a "
                f"different {what}: one policy name has one document, description and path; "
                "make them equal or rename one policy",
                index,
                "policy",
            )


def _check_timing(index: int, timing: Timing) -> None:
    keys = timing.max_keys
    occupied = timing.grace + timing.inactive_period
    if occupied >= (keys - 1) * timing.max_age:
        if keys == 2:
            limit = f"max_age ({format_duration(timing.max_age)})"
        else:
            limit = f"{keys - 1} x max_age ({format_duration((keys - 1) * timing.max_age)})"
        raise _invalid(
            f"grace ({format_duration(timing.grace)}) + inactive_period "
            f"({format_duration(timing.inactive_period)}) must be shorter than {limit} with "
            f"max_keys {keys}, or the next rotation would find no free key slot; shorten grace "
            "or inactive_period, lengthen max_age, or raise max_keys",
            index,
        )
    if timing.verify_timeout >= timing.max_age:
        raise _invalid(
            f"verify_timeout ({format_duration(timing.verify_timeout)}) must be shorter than "
            f"max_age ({format_duration(timing.max_age)})",
            index,
            "verify_timeout",
        )
    if timing.check_interval >= timing.max_age:
        raise _invalid(
            f"check_interval ({format_duration(timing.check_interval)}) must be shorter than "
            f"max_age ({format_duration(timing.max_age)}), or keys would outlive max_age",
            index,
            "check_interval",
        )


# --- loading ---------------------------------------------------------------------------------


# libyaml's parser when PyYAML has it (the wheels do): a large fleet's config parses in a
# fraction of the time and memory of the pure-Python one; the constructor is the same.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with << may be overridden on purpose
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in the same mapping (first on line "
                    f"{seen[key] + 1}): keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        except TypeError:
            pass  # an unhashable key; construct_mapping reports it
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _marked(construct: Any, problem: str) -> Any:
    """A PyYAML constructor whose ValueError becomes a ConstructorError with the value's line."""

    def constructor(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        try:
            return construct(loader, node)
        except ValueError as exc:
            detail = problem.format(value=_show(node.value), error=exc)
            raise yaml.constructor.ConstructorError(None, None, detail, node.start_mark) from None

    return constructor


# The two scalar constructors that raise ValueError on text their pattern accepts.
for _tag, _problem in (
    ("int", "{value} is a number too long to read: shorten it"),  # int() refuses 4300+ digits
    ("timestamp", "{value} is not a valid date ({error}): fix it, or quote it"),  # 2024-02-30
):
    _Loader.add_constructor(
        f"tag:yaml.org,2002:{_tag}",
        _marked(_SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{_tag}"], _problem),
    )


def load(path: str | os.PathLike[str]) -> Settings:
    """Read, validate and freeze the config file; any problem is one ConfigError."""
    source = Path(path).absolute()
    try:
        text = _read_bounded(source, CONFIG_FILE_MAX_CHARS)
    except FileNotFoundError:
        raise errors.ConfigError(
            "", f"config file {source} does not exist: give its path with -c or ROTATOR_CONFIG"
        ) from None
    except _NotRegularFile as exc:
        raise errors.ConfigError(
            "",
            f"config file {source} is {exc.kind}, not a regular file: give the path of the "
            "rotator's YAML config with -c or ROTATOR_CONFIG",
        ) from None
    except OSError as exc:
        raise errors.ConfigError(
            "", f"cannot read config file {source}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise errors.ConfigError("", f"config file {source} is not UTF-8 text") from None
    if text is None:
        raise errors.ConfigError(
            "",
            f"config file {source} is longer than {CONFIG_FILE_MAX_CHARS} characters: "
            "give the path of the rotator's YAML config",
        )
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = exc.problem or exc.context or "syntax error"
        raise errors.ConfigError(
            "", _one_line(f"config file {source} is not valid YAML{where}: {problem}")
        ) from None
    except yaml.YAMLError as exc:
        raise errors.ConfigError(
            "", _one_line(f"config file {source} is not valid YAML: {exc}")
        ) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # a constructor not wrapped above
        raise errors.ConfigError(
            "", _one_line(f"config file {source} holds a value YAML cannot read: {exc}")
        ) from None
    if raw is None:
        raise errors.ConfigError(
            "", f"config file {source} is empty: see config/rotator.example.yaml"
        )
    if not isinstance(raw, dict):
        raise errors.ConfigError(
            "", f"config file {source} must hold a mapping of keys (vault:, targets:, ...)"
        )
    if "source" in raw:
        raise errors.ConfigError("source", _unknown_key_message("source", ()))
    try:
        return Settings.model_validate(
            {**raw, "source": source}, context={"base_dir": source.parent}
        )
    except ValidationError as exc:
        raise _config_error(exc) from None


# --- reading secret files at use time --------------------------------------------------------


def _read_text(path: str | os.PathLike[str], key_path: str) -> tuple[Path, str]:
    file = resolve_file(path, key_path)
    try:
        text = _read_bounded(file, SECRET_FILE_MAX_CHARS)
    except _NotRegularFile as exc:
        raise errors.ConfigError(
            key_path,
            f"{file} is {exc.kind}, not a regular file: give the file that holds only the secret",
        ) from None
    except OSError as exc:
        raise errors.ConfigError(key_path, f"cannot read {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        # Never show the decoding error: it quotes the file's bytes.
        raise errors.ConfigError(key_path, f"{file} is not UTF-8 text") from None
    if text is None:
        raise errors.ConfigError(
            key_path,
            f"{file} is longer than {SECRET_FILE_MAX_CHARS} characters: give the file that "
            "holds only the secret",
        )
    return file, text


def read_secret_file(path: str | os.PathLike[str], key_path: str) -> Secret:
    """The stripped content of a secret file (``credential:NAME`` allowed); empty is an error."""
    file, text = _read_text(path, key_path)
    value = text.strip()
    if not value:
        raise errors.ConfigError(key_path, f"{file} is empty: write the secret into it")
    _check_secret_text(value, f"{file}", key_path)
    return Secret(value)


def _check_secret_text(value: str, where: str, key_path: str) -> None:
    """A token, secret id, JWT or secret key is one word: text around it (a second line, a
    comment, quotes) would be sent as part of it, and the server's refusal, an invalid header
    or a bad signature, would not say why. The value itself is never shown."""
    if any(c.isspace() for c in value):
        raise errors.ConfigError(
            key_path,
            f"{where} holds more than the secret (a second line, a space or a comment): it "
            "must hold the secret alone, on one line",
        )
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        raise errors.ConfigError(
            key_path, f"{where} holds the secret in quotes: write it without them"
        )


_ACCESS_KEY_ID = "aws_access_key_id"
_SECRET_ACCESS_KEY = "aws_secret_access_key"  # noqa: S105 - a key name


def read_eim_credentials(settings: EimSettings) -> tuple[str, Secret] | None:
    """(access key id, secret) from ``eim.credentials_file``; None: use boto3's standard chain.

    The file has AWS shared-credentials lines ``aws_access_key_id = ...`` and
    ``aws_secret_access_key = ...``; a ``[section]`` header, blank lines, ``#`` and ``;``
    comments and other keys are ignored.
    """
    if settings.credentials_file is None:
        return None
    key_path = "eim.credentials_file"
    file, text = _read_text(settings.credentials_file, key_path)
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            continue
        name, sep, value = stripped.partition("=")
        if not sep:
            # The line itself is never shown: it may be a secret pasted on its own.
            raise errors.ConfigError(
                key_path, f"line {number} of {file} is not 'name = value': fix or remove it"
            )
        name = name.strip().lower()
        if name not in (_ACCESS_KEY_ID, _SECRET_ACCESS_KEY):
            continue
        if name in values:
            raise errors.ConfigError(
                key_path, f"{name} appears twice in {file} (line {number}): keep one"
            )
        values[name] = value.strip()
        if values[name]:
            _check_secret_text(values[name], f"the {name} of {file} (line {number})", key_path)
    for name in (_ACCESS_KEY_ID, _SECRET_ACCESS_KEY):
        if not values.get(name):
            raise errors.ConfigError(key_path, f"{file} has no {name}: add a line '{name} = ...'")
    return values[_ACCESS_KEY_ID], Secret(values[_SECRET_ACCESS_KEY])


def check_ca_file(path: str | os.PathLike[str], key_path: str = "vault.ca_file") -> Path:
    """The CA bundle to verify Vault's certificate with, once it is known to be readable.

    Checked where it is used (at start, at each reload, by check-config), not at load: like
    the secret files, it may be a systemd credential or a file mounted only in the pod.
    A directory of hashed certificates (``c_rehash``) is accepted, as requests accepts it.
    """
    file = resolve_file(path, key_path)
    fix = "give the PEM file of the CA that signed Vault's certificate, or remove the key"
    try:
        if file.is_dir():
            next(file.iterdir(), None)  # a directory we cannot list is an error now, not later
        else:
            with os.fdopen(_open_regular(file), "rb") as stream:
                stream.read(1)
    except _NotRegularFile as exc:
        raise errors.ConfigError(
            key_path, f"{file} is {exc.kind}, not a regular file: {fix}"
        ) from None
    except FileNotFoundError:
        raise errors.ConfigError(key_path, f"{file} does not exist: {fix}") from None
    except OSError as exc:
        raise errors.ConfigError(
            key_path, f"cannot read {file}: {exc.strerror or exc}; {fix}"
        ) from None
    return file


def vault_token_origin(settings: VaultSettings) -> str:
    """Where :func:`read_vault_token` takes the token from, for messages."""
    if os.environ.get("VAULT_TOKEN", "").strip():
        return "$VAULT_TOKEN in rotator's environment (it wins over vault.auth.token_file)"
    return f"vault.auth.token_file ({settings.auth.token_file})"


def vault_token_fix(settings: VaultSettings) -> str:
    """How a new token reaches rotator from where :func:`read_vault_token` takes it."""
    if os.environ.get("VAULT_TOKEN", "").strip():
        return "issue a new token, set VAULT_TOKEN to it in rotator's environment, restart rotator"
    token_file = os.fspath(settings.auth.token_file or "")
    if token_file.startswith(CREDENTIAL_PREFIX):
        name = token_file.removeprefix(CREDENTIAL_PREFIX)
        return (
            f"issue a new token, write it to the file the unit's LoadCredential={name}:<file> "
            "names, then restart rotator (systemctl restart rotator): systemd copies "
            "credentials once, at start"
        )
    return f"issue a new token and write it to {token_file} (re-read without a restart)"


def read_vault_token(settings: VaultSettings) -> Secret:
    """The static Vault token of auth method ``token``: VAULT_TOKEN, else ``auth.token_file``.

    The approle and kubernetes methods have no static token; they log in with
    :func:`read_secret_file` on ``secret_id_file`` / ``token_file``.
    """
    auth = settings.auth
    if auth.method != "token":
        raise errors.ConfigError(
            "vault.auth.method",
            f"method {auth.method} logs in to Vault and has no static token to read",
        )
    token = os.environ.get("VAULT_TOKEN", "").strip()
    if token:
        _check_secret_text(token, "VAULT_TOKEN", "vault.auth.token_file")
        return Secret(token)
    if auth.token_file is None:
        raise errors.ConfigError(
            "vault.auth.token_file", "no Vault token: set VAULT_TOKEN or vault.auth.token_file"
        )
    return read_secret_file(auth.token_file, "vault.auth.token_file")


# --- pydantic errors as ConfigError ----------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_key_path(loc: tuple[str | int, ...]) -> str:
    """``("targets", 0, "grace")`` -> ``targets[0].grace``."""
    path = ""
    for part in loc:
        path = _json_path(path, part)
    return path


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _valid_keys(parent: tuple[str | int, ...]) -> list[str] | None:
    """The keys accepted at ``parent`` (a loc inside Settings), or None if not a known model."""
    model: type[BaseModel] | None = Settings
    for part in parent:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = None if field is None else _model_in(field.annotation)
    if model is None:
        return None
    return [name for name in model.model_fields if not (model is Settings and name == "source")]


def _unknown_key_message(key: str | int, parent: tuple[str | int, ...]) -> str:
    message = f"unknown key '{key}'"
    valid = _valid_keys(parent)
    if valid:
        close = difflib.get_close_matches(str(key), valid, n=1)
        if close:
            message += f" (did you mean '{close[0]}'?)"
        message += "; valid keys here: " + ", ".join(valid)
    return message


_GENERIC_EXPECTED = {
    "string_type": "expected a string",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "bool_type": "expected true or false",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "dict_type": "expected a mapping",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "path_type": "expected a file path",
}


def _config_error(exc: ValidationError) -> errors.ConfigError:
    """The first problem of a ValidationError, with its key path, on one line.

    An unknown key comes first: a typo (``secretpath``) also makes the real key look missing,
    and the typo is the thing to fix.
    """
    found = exc.errors(include_url=False)
    error = next((e for e in found if e["type"] == "extra_forbidden"), found[0])
    loc = tuple(error["loc"])
    kind = error["type"]
    context = error.get("ctx") or {}
    value = error.get("input")
    if kind == _ERROR_TYPE:
        loc += tuple(context.get("key", ()))
        message = str(context["message"])
    elif kind == "value_error":
        message = str(context.get("error", error["msg"]))
    elif kind == "extra_forbidden":
        message = _unknown_key_message(loc[-1], loc[:-1])
    elif kind == "missing":
        message = "required key is missing: add it"
    elif kind == "literal_error":
        message = f"invalid value {_show(value)}: use {context.get('expected', 'a listed value')}"
    elif kind in _GENERIC_EXPECTED:
        message = f"{_GENERIC_EXPECTED[kind]}, got {_show(value)}"
        if kind == "string_type" and loc[-1:] == ("listen",) and isinstance(value, int):
            message = (  # a bare port: quoting it alone would only give the next error
                f"expected host:port, got the port {value} alone: give "
                f"'0.0.0.0:{value}' (every interface) or '127.0.0.1:{value}'"
            )
        elif kind == "string_type" and not isinstance(value, Mapping | list | tuple):
            message += ": quote the value"
    else:
        message = f"{error['msg'].replace('Input should be', 'must be')}, got {_show(value)}"
    return errors.ConfigError(format_key_path(loc), _one_line(message))


__all__ = [
    "AppRoleSettings",
    "ConfigPath",
    "Duration",
    "EimSettings",
    "KubernetesAuthSettings",
    "LoggingSettings",
    "MetricsSettings",
    "PolicySpec",
    "Settings",
    "Target",
    "Timing",
    "VaultAuthSettings",
    "VaultSettings",
    "check_ca_file",
    "format_duration",
    "format_key_path",
    "load",
    "parse_duration",
    "parse_listen",
    "read_eim_credentials",
    "read_secret_file",
    "read_vault_token",
    "resolve_file",
    "unused_settings",
]
